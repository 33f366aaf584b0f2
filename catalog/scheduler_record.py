"""The scheduler record: how a scheduler advertises itself in the DHT, and the one way to read it.

A node with the scheduler role keeps a signed record of kind :data:`KIND` in the DHT
(:mod:`node.dht_records`) whose payload is a :class:`SchedulerRecord`, a msgpack map::

    {"name": str, "peer_id": str, "addrs": [str]}

Workers, owners, other schedulers and ``vmlend schedulers`` all read these records through
:class:`SchedulerDirectory`. Anyone can publish a correctly signed record of this kind with any
payload, so a reader decodes each one: a payload that is not a scheduler record, that names
another peer than its signer, or whose addresses are not the signer's is skipped and reported
once, never raised into the reader. Which of the schedulers found a node uses when none is named
is :mod:`catalog.scheduler_choice`'s rule (never the order of their peer IDs, which anyone can
grind a key for).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from node.dht_records import InvalidRecordError, Record, public_key_of
from node.errors import LocalProtocolError
from node.wire_message import decode_record, encode_record, tuple_of, wire

log = logging.getLogger("vmlend.catalog.scheduler_record")

KIND = "scheduler"
TTL = 300.0  # republished every TTL / 3
MAX_NAME = 64  # as the name node.toml accepts
MAX_ADDRS = 16
MAX_ADDR = 512
MAX_REPORTED = 1024  # bad records remembered as already reported, per reader
MAX_LOGGED = 200  # characters of a bad record's reason in the log


def _addr(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_ADDR:
        raise LocalProtocolError(f"an address must be a str of 1..{MAX_ADDR} characters")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerRecord:
    """A scheduler: a name for people, its peer ID (the record's signer) and the multiaddrs it
    listens on, each ending in ``/p2p/<peer_id>`` so that dialling one reaches that peer."""

    name: str
    peer_id: str
    addrs: tuple[str, ...] = field(metadata=wire(decode=tuple_of(_addr, limit=MAX_ADDRS)))

    def __post_init__(self) -> None:
        if type(self.name) is not str or len(self.name) > MAX_NAME or not self.name.isprintable():
            raise LocalProtocolError(f"name must be at most {MAX_NAME} printable characters")
        if type(self.peer_id) is not str:
            raise LocalProtocolError("peer_id must be a str")
        try:
            public_key_of(self.peer_id)
        except ValueError:
            raise LocalProtocolError(f"peer_id {self.peer_id[:64]!r} is not a peer ID") from None
        if not isinstance(self.addrs, tuple) or len(self.addrs) > MAX_ADDRS:
            raise LocalProtocolError(f"at most {MAX_ADDRS} addresses")
        suffix = f"/p2p/{self.peer_id}"
        for addr in self.addrs:
            _addr(addr)
            if not (addr.startswith("/") and addr.endswith(suffix) and addr.isprintable()):
                raise LocalProtocolError(f"address {addr[:64]!r} is not a multiaddr of {suffix}")

    def to_payload(self) -> dict[str, Any]:
        """The record's payload (``schedulers.list`` answers with it, plus ``trusted`` and
        ``default``: :mod:`catalog.scheduler_choice`)."""
        return encode_record(self)


def decode(record: Record) -> SchedulerRecord:
    """The scheduler ``record`` advertises; :class:`InvalidRecordError` if its payload is not a
    scheduler record or names another peer than the record's signer."""
    if record.kind != KIND:
        raise InvalidRecordError(f"a {record.kind} record is not a {KIND} record")
    try:
        scheduler = decode_record(SchedulerRecord, record.payload)
    except (LocalProtocolError, TypeError, ValueError) as e:
        raise InvalidRecordError(f"not a scheduler record: {e}") from None
    if scheduler.peer_id != record.owner:
        raise InvalidRecordError(f"names peer {scheduler.peer_id}, signed by {record.owner}")
    return scheduler


class RecordFinder(Protocol):
    """What a directory needs of the p2p node (:class:`node.p2p.P2PNode` is one)."""

    async def find_records(self, kind: str, *, timeout: float) -> list[Record]: ...  # noqa: ASYNC109


class SchedulerDirectory:
    """One reader's view of the schedulers in the DHT. A record that does not decode is skipped
    and logged once per reader (per publisher and issue time, the reason cut to a size)."""

    def __init__(self, network: RecordFinder) -> None:
        self._network = network
        self._reported: set[tuple[str, float]] = set()
        # Of the last lookup: schedulers listed from an earlier one, because their record or
        # the index could not be reached in time (see node.p2p_records).
        self.stale: frozenset[str] = frozenset()

    async def find(self, *, timeout: float) -> list[SchedulerRecord]:  # noqa: ASYNC109
        """Every scheduler advertised by a valid record, by peer ID; raises what
        ``find_records`` raises (:class:`node.errors.NetworkError`)."""
        records = await self._network.find_records(KIND, timeout=timeout)
        self.stale = frozenset(r.owner for r in records if r.stale)
        return self.decode_all(records)

    def decode_all(self, records: Iterable[Record]) -> list[SchedulerRecord]:
        found: list[SchedulerRecord] = []
        for record in records:
            try:
                found.append(decode(record))
            except InvalidRecordError as e:
                self._report(record, str(e))
        return found

    def _report(self, record: Record, reason: str) -> None:
        seen = (record.owner, record.issued_at)
        if seen in self._reported:
            return
        if len(self._reported) >= MAX_REPORTED:
            self._reported.clear()
        self._reported.add(seen)
        log.warning(
            "misbehaving peer %s: skipped its scheduler record: %s", record.owner, cut(reason)
        )


def cut(text: str, limit: int = MAX_LOGGED) -> str:
    """``text`` as it may be logged: unprintable characters escaped, at most ``limit``
    characters, then (if it was longer) its length and hash."""
    safe = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if len(safe) <= limit:
        return safe
    digest = blake3.blake3(text.encode(errors="replace")).hexdigest()[:16]
    return f"{safe[:limit]}... ({len(text)} characters, blake3 {digest})"
