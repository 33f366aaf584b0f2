"""The worker agent's lease file (``<data>/agent_leases.json``), read back as a stranger's input.

It holds the leases whose VMs a crash would lose (their schedulers are told) and the finished
results not yet delivered (delivered after a restart). Every kept result is parsed back through
the dispatch protocol's own decoder, so a damaged file yields valid messages or is refused
whole (:func:`node.durable.read_state` sets it aside).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack

from catalog.dispatch import REQUESTS, LeaseKey, ResultReport, lease_from_list
from node.errors import LocalProtocolError, ProtocolError

log = logging.getLogger("vmlend.worker.agent")

MAX_KEPT_RESULTS = 1024  # read back from the lease file at most; each is one finished lease


@dataclass(frozen=True, slots=True)
class State:
    """What the lease file holds: leases lost if we crashed, and results not yet delivered."""

    lost: dict[str, list[LeaseKey]]
    kept: dict[str, list[tuple[ResultReport, float]]]  # scheduler -> (report, lease_timeout)


def report_to_hex(report: ResultReport) -> str:
    packed: bytes = msgpack.packb(REQUESTS.encode(report), use_bin_type=True)
    return packed.hex()


def _report_from_hex(raw: object) -> ResultReport:
    if not isinstance(raw, str) or len(raw) > 8192:
        raise ValueError("a kept result is a hex string")
    try:
        message = REQUESTS.decode(msgpack.unpackb(bytes.fromhex(raw), raw=False))
    except (ProtocolError, msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"a kept result: {e}") from None
    if not isinstance(message, ResultReport):
        raise ValueError("a kept result is not a result")
    return message


def _leases_of(raw: object) -> dict[str, list[LeaseKey]]:
    if not isinstance(raw, dict):
        raise ValueError("not a map of schedulers to leases")
    try:
        return {str(s): [lease_from_list(x) for x in keys] for s, keys in raw.items()}
    except LocalProtocolError as e:
        raise ValueError(str(e)) from None


def _kept_of(raw: object) -> dict[str, list[tuple[ResultReport, float]]]:
    if not isinstance(raw, dict):
        raise ValueError("not a map of schedulers to results")
    kept: dict[str, list[tuple[ResultReport, float]]] = {}
    count = 0
    for scheduler, entries in raw.items():
        for entry in entries:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("timeout"), int | float):
                raise ValueError("a kept result is {report, timeout}")
            count += 1
            if count > MAX_KEPT_RESULTS:
                log.warning("more than %d kept results: the rest are dropped", MAX_KEPT_RESULTS)
                return kept
            timeout = min(max(float(entry["timeout"]), 1.0), 3600.0)
            kept.setdefault(str(scheduler), []).append((_report_from_hex(entry["report"]), timeout))
    return kept


def parse_state(data: bytes) -> State:
    raw = json.loads(data)
    if isinstance(raw, dict) and raw.keys() == {"leases", "results"}:
        return State(_leases_of(raw["leases"]), _kept_of(raw["results"]))
    return State(_leases_of(raw), {})  # as written before results were kept
