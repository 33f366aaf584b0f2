"""Strict field codecs shared by the dispatch messages and the scheduler's database.

Each check returns the value it accepted or raises :class:`LocalProtocolError`; the message
decoder turns that into :class:`RemoteProtocolError` for what a peer sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from node.errors import LocalProtocolError
from scheduler_role.errors import InvalidTaskError
from scheduler_role.task import MAX_REPLICAS, LeaseKey, check_id
from worker_role.caps import Caps, NetworkMode

MAX_TEXT = 512
MAX_NET_ALLOW = 64
MAX_ATTEMPT = 2**31 - 1
MAX_SECONDS = 7 * 24 * 3600.0

T = TypeVar("T")


def as_int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def as_seconds(name: str, value: object, low_exclusive: float = 0.0) -> float:
    # bool is an int subclass; a peer's True is not one second.
    if type(value) not in (int, float) or not isinstance(value, int | float):
        raise LocalProtocolError(f"{name} must be a number of seconds")
    if not (math.isfinite(value) and low_exclusive < value <= MAX_SECONDS):
        raise LocalProtocolError(f"{name} must be seconds in ({low_exclusive}, {MAX_SECONDS}]")
    return float(value)


def as_bytes(name: str, value: object, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise LocalProtocolError(f"{name} must be {size} bytes")
    return value


def as_text(name: str, value: object) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise LocalProtocolError(f"{name} must be a str of <= {MAX_TEXT} characters")
    return value


def as_tuple(name: str, value: object, limit: int, item: Callable[[object], T]) -> tuple[T, ...]:
    if not isinstance(value, list | tuple) or len(value) > limit:
        raise LocalProtocolError(f"{name} must be a list of <= {limit} items")
    return tuple(item(v) for v in value)


def check_keys(
    kind: str, raw: Mapping[str, Any], required: set[str], optional: frozenset[str]
) -> None:
    given = set(raw)
    if not required <= given or not given <= required | optional:
        raise LocalProtocolError(
            f"{kind}: missing {sorted(required - given)}, "
            f"unexpected {sorted(given - required - optional)}"
        )


def as_map(name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise LocalProtocolError(f"{name} must be a map")
    return value


# --- shared parts -------------------------------------------------------------------------------

_CAPS_KEYS = {f for f in Caps.__dataclass_fields__}


def caps_to_dict(caps: Caps) -> dict[str, Any]:
    out = {f: getattr(caps, f) for f in _CAPS_KEYS}
    out["network"] = caps.network.value
    out["net_allow"] = list(caps.net_allow)
    return out


def caps_from_dict(raw: object) -> Caps:
    value = as_map("caps", raw)
    check_keys("caps", value, _CAPS_KEYS, frozenset())
    try:
        return Caps(
            vcpus=as_int("vcpus", value["vcpus"], 1, 1024),
            cpu_share=as_seconds("cpu_share", value["cpu_share"]),  # a positive finite number
            memory_mib=as_int("memory_mib", value["memory_mib"], 32, 2**40),
            disk_mib=as_int("disk_mib", value["disk_mib"], 1, 2**40),
            disk_bps=as_int("disk_bps", value["disk_bps"], 0, 2**62),
            disk_iops=as_int("disk_iops", value["disk_iops"], 0, 2**62),
            network=NetworkMode(as_text("network", value["network"])),
            net_bps=as_int("net_bps", value["net_bps"], 0, 2**62),
            net_allow=as_tuple("net_allow", value["net_allow"], MAX_NET_ALLOW, _allow_entry),
        )
    except ValueError as e:  # Caps' own checks, and an unknown network mode
        raise LocalProtocolError(f"caps: {e}") from None


def _allow_entry(value: object) -> str:
    return as_text("net_allow entry", value)


def lease_to_list(lease: LeaseKey) -> list[Any]:
    return [lease.task_id, lease.replica, lease.attempt]


def lease_from_list(raw: object) -> LeaseKey:
    if not isinstance(raw, list | tuple) or len(raw) != 3:
        raise LocalProtocolError("a lease is [task, replica, attempt]")
    task: object = raw[0]
    try:
        task_id = check_id("task", task)
    except InvalidTaskError as e:
        raise LocalProtocolError(str(e)) from None
    return LeaseKey(
        task_id,
        as_int("replica", raw[1], 0, MAX_REPLICAS - 1),
        as_int("attempt", raw[2], 1, MAX_ATTEMPT),
    )


def check_lease(lease: object) -> None:
    if not isinstance(lease, LeaseKey):
        raise LocalProtocolError("lease must be a LeaseKey")
    lease_from_list(lease_to_list(lease))
