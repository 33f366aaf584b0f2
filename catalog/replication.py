"""Catalog anti-entropy between schedulers (``/vmlend/catalog-sync/1.0.0``), sans-IO.

Pull only: a scheduler asks a peer what it has and fetches what it lacks; the peer never pushes.
IDs are grouped into 256 buckets by their first byte. A bucket's hash is blake3 of its sorted raw
IDs, the root is blake3 of the 256 bucket hashes. One pull, as messages on one stream::

    puller -> {"type": "summary_request", "root": bin32}
    server <- {"type": "in_sync"}                         # same root: done
            | {"type": "summary", "buckets": [bin32] * 256}
    puller -> {"type": "ids_request", "buckets": [int]}    # the buckets whose hashes differ
    server <- {"type": "ids", "buckets": [[int, [bin32]]]} # a prefix of them that fits a reply
    ...      (until every differing bucket is listed)
    puller -> {"type": "entries_request", "ids": [bin32]}  # at most MAX_ENTRIES_PER_REQUEST
    server <- {"type": "entries", "entries": [bin]}        # Entry.encode() of each it holds
    ...      (until every missing ID was asked for), then the puller ends the stream.

Nothing a peer sends is trusted: every entry must be one we asked for (its ID is the hash of its
body, so a changed body is an entry we did not ask for), must decode canonically and must carry a
valid signature. Any of those failing, or any malformed or out-of-order message, raises
:class:`MisbehavingPeerError`: the session ends and the glue marks the peer. A well-signed entry
from a publisher we do not trust is *not* misbehaviour (the peer may trust more publishers than
we do), nor is one that breaks only our rules for its kind (the peer may run other rules): it is
refused with its reason and remembered, so it is not fetched again every round.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import blake3

from catalog.entries import Entry, TrustPolicy, decode_entry, entry_id, split_encoded
from catalog.errors import EntryRuleError, InvalidEntryError, UntrustedPublisherError
from node.errors import LocalProtocolError, RemoteProtocolError
from node.wire import Message

PROTOCOL_ID = "/vmlend/catalog-sync/1.0.0"
BUCKETS = 256
ID_SIZE = 32
MAX_IDS_PER_REPLY = 16_384  # 32-byte IDs: ~0.6 MiB per frame
MAX_ENTRIES_PER_REQUEST = 32  # at most 32 x 64 KiB bodies: ~2 MiB per frame
MAX_MESSAGES_PER_SESSION = 10_000  # per stream (~320k entries): bounds what one peer costs us

_EMPTY_BUCKET = blake3.blake3(b"").digest()


class MisbehavingPeerError(RemoteProtocolError):
    """The peer sent a forged, tampered, unrequested or malformed entry, or broke the protocol."""


# ---- the ID index ----------------------------------------------------------------------------


class IdIndex:
    """The set of entry IDs (hex) a library holds, with cached per-bucket hashes."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._buckets: list[set[bytes]] = [set() for _ in range(BUCKETS)]
        self._hashes: list[bytes | None] = [_EMPTY_BUCKET] * BUCKETS
        self._count = 0
        for each in ids:
            self.add(each)

    def add(self, entry_id: str) -> bool:
        raw = bytes.fromhex(entry_id)
        if len(raw) != ID_SIZE:
            raise ValueError(f"not an entry ID: {entry_id!r}")
        bucket = self._buckets[raw[0]]
        if raw in bucket:
            return False
        bucket.add(raw)
        self._hashes[raw[0]] = None
        self._count += 1
        return True

    def __contains__(self, entry_id: object) -> bool:
        if not isinstance(entry_id, str) or len(entry_id) != 2 * ID_SIZE:
            return False
        try:
            raw = bytes.fromhex(entry_id)
        except ValueError:
            return False
        return raw in self._buckets[raw[0]]

    def __len__(self) -> int:
        return self._count

    def bucket_hash(self, bucket: int) -> bytes:
        cached = self._hashes[bucket]
        if cached is None:
            cached = blake3.blake3(b"".join(sorted(self._buckets[bucket]))).digest()
            self._hashes[bucket] = cached
        return cached

    def bucket_hashes(self) -> list[bytes]:
        return [self.bucket_hash(b) for b in range(BUCKETS)]

    def root(self) -> bytes:
        return blake3.blake3(b"".join(self.bucket_hashes())).digest()

    def bucket_ids(self, bucket: int) -> list[bytes]:
        return sorted(self._buckets[bucket])


# ---- message shapes --------------------------------------------------------------------------


def _field(msg: Message, key: str, kind: type, what: str) -> Any:
    value = msg.get(key)
    if type(value) is not kind:
        raise MisbehavingPeerError(f"{what}: {key!r} must be a {kind.__name__}")
    return value


def _expect(msg: Message, type_: str, keys: set[str]) -> None:
    if msg.get("type") != type_ or set(msg) != keys | {"type"}:
        raise MisbehavingPeerError(
            f"expected a {type_} with keys {sorted(keys)}, got {msg.get('type')!r} "
            f"with keys {sorted(map(str, msg))}"
        )


def _raw_ids(value: Any, what: str, limit: int) -> list[bytes]:
    if type(value) is not list or len(value) > limit:
        raise MisbehavingPeerError(f"{what}: want a list of at most {limit} IDs")
    if not all(type(v) is bytes and len(v) == ID_SIZE for v in value):
        raise MisbehavingPeerError(f"{what}: every ID must be {ID_SIZE} bytes")
    return list(value)


def _bucket_list(value: Any, what: str) -> list[int]:
    if type(value) is not list or not 0 < len(value) <= BUCKETS:
        raise MisbehavingPeerError(f"{what}: want 1..{BUCKETS} bucket numbers")
    if not all(type(b) is int and 0 <= b < BUCKETS for b in value) or len(set(value)) != len(value):
        raise MisbehavingPeerError(f"{what}: bucket numbers must be distinct ints in [0, 255]")
    return list(value)


# ---- the serving side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WantEntries:
    """The glue must load these entries (hex IDs) and answer with :func:`entries_reply`."""

    ids: list[str]


def respond(msg: Message, index: IdIndex) -> Message | WantEntries:
    """The answer to one request from a puller (raises :class:`MisbehavingPeerError`)."""
    kind = msg.get("type")
    if kind == "summary_request":
        _expect(msg, "summary_request", {"root"})
        root = _field(msg, "root", bytes, "summary_request")
        if root == index.root():
            return {"type": "in_sync"}
        return {"type": "summary", "buckets": index.bucket_hashes()}
    if kind == "ids_request":
        _expect(msg, "ids_request", {"buckets"})
        served: list[list[Any]] = []
        total = 0
        for bucket in _bucket_list(msg["buckets"], "ids_request"):
            ids = index.bucket_ids(bucket)
            # Always serve at least one bucket (truncated if it alone is huge) so a pull
            # progresses; later buckets wait for the next request.
            if served and total + len(ids) > MAX_IDS_PER_REPLY:
                break
            ids = ids[:MAX_IDS_PER_REPLY]
            served.append([bucket, ids])
            total += len(ids)
        return {"type": "ids", "buckets": served}
    if kind == "entries_request":
        _expect(msg, "entries_request", {"ids"})
        raw = _raw_ids(msg["ids"], "entries_request", MAX_ENTRIES_PER_REQUEST)
        return WantEntries([r.hex() for r in raw])
    raise MisbehavingPeerError(f"unexpected request {kind!r}")


def entries_reply(encoded: Sequence[bytes]) -> Message:
    if len(encoded) > MAX_ENTRIES_PER_REQUEST:
        raise LocalProtocolError(f"{len(encoded)} entries > {MAX_ENTRIES_PER_REQUEST} per reply")
    return {"type": "entries", "entries": list(encoded)}


# ---- the pulling side ------------------------------------------------------------------------


class _State(Enum):
    IDLE = auto()
    SUMMARY = auto()
    IDS = auto()
    ENTRIES = auto()
    DONE = auto()


@dataclass(slots=True)
class PullSession:
    """One pull from one peer. ``start()``, then feed each reply to ``receive()`` and send what
    it returns until it returns None. Afterwards ``admitted`` holds the entries to insert (each
    decoded, hash-checked, signature-checked and trusted) and ``refused`` maps the IDs of
    well-signed entries from untrusted publishers to the reason. ``skip``: IDs not to fetch
    (refused before)."""

    local: IdIndex
    policy: TrustPolicy
    skip: Container[str] = frozenset()
    admitted: list[Entry] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    _state: _State = _State.IDLE
    _pending_buckets: list[int] = field(default_factory=list)
    _missing: list[str] = field(default_factory=list)
    _asked: set[str] = field(default_factory=set)
    _in_flight: list[str] = field(default_factory=list)  # IDs of the entries_request out

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def start(self) -> Message:
        if self._state is not _State.IDLE:
            raise LocalProtocolError("a pull session starts once")
        self._state = _State.SUMMARY
        return {"type": "summary_request", "root": self.local.root()}

    def receive(self, msg: Message) -> Message | None:
        """The next request to send, or None when the pull is complete."""
        if self._state is _State.SUMMARY:
            return self._on_summary(msg)
        if self._state is _State.IDS:
            return self._on_ids(msg)
        if self._state is _State.ENTRIES:
            return self._on_entries(msg)
        raise LocalProtocolError(f"receive() in state {self._state.name}")

    def _on_summary(self, msg: Message) -> Message | None:
        if msg.get("type") == "in_sync":
            _expect(msg, "in_sync", set())
            return self._finish()
        _expect(msg, "summary", {"buckets"})
        theirs = msg["buckets"]
        if type(theirs) is not list or len(theirs) != BUCKETS:
            raise MisbehavingPeerError(f"summary: want {BUCKETS} bucket hashes")
        self._pending_buckets = [b for b, h in enumerate(theirs) if h != self.local.bucket_hash(b)]
        return self._next()

    def _on_ids(self, msg: Message) -> Message | None:
        _expect(msg, "ids", {"buckets"})
        served = msg["buckets"]
        if type(served) is not list or not served:
            raise MisbehavingPeerError("ids: want a non-empty list of [bucket, ids]")
        listed = 0
        for item in served:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not int:
                raise MisbehavingPeerError("ids: each item must be [bucket, ids]")
            bucket = item[0]
            if bucket not in self._pending_buckets:
                raise MisbehavingPeerError(f"ids: bucket {bucket} was not asked for")
            self._pending_buckets.remove(bucket)
            raw_ids = _raw_ids(item[1], "ids", MAX_IDS_PER_REPLY - listed)
            listed += len(raw_ids)
            for raw in raw_ids:
                if raw[0] != bucket:
                    raise MisbehavingPeerError(f"ids: {raw.hex()} is not in bucket {bucket}")
                entry_id = raw.hex()
                if entry_id in self.local or entry_id in self.skip or entry_id in self._asked:
                    continue
                self._asked.add(entry_id)
                self._missing.append(entry_id)
        return self._next()

    def _on_entries(self, msg: Message) -> Message | None:
        _expect(msg, "entries", {"entries"})
        encoded = msg["entries"]
        if type(encoded) is not list or len(encoded) > len(self._in_flight):
            raise MisbehavingPeerError("entries: more entries than were asked for")
        seen: set[str] = set()
        for data in encoded:
            if type(data) is not bytes:
                raise MisbehavingPeerError("entries: each entry must be bytes")
            try:
                body, _ = split_encoded(data)
            except InvalidEntryError as e:
                raise MisbehavingPeerError(f"sent a malformed entry: {e}") from e
            # The ID is the hash of the body: a changed body is an entry we did not ask for.
            got_id = entry_id(body)
            if got_id not in self._in_flight or got_id in seen:
                raise MisbehavingPeerError(
                    f"sent entry {got_id} that was not asked for (tampered, or a duplicate)"
                )
            seen.add(got_id)
            try:
                entry = decode_entry(data)
            except EntryRuleError as e:
                # Well formed, but our rules for its kind differ from the sender's (e.g. another
                # version): refuse it, the peer is not at fault.
                self.refused[got_id] = str(e)
                continue
            except InvalidEntryError as e:
                raise MisbehavingPeerError(f"sent a malformed entry: {e}") from e
            try:
                self.policy.admit(entry)
            except UntrustedPublisherError as e:
                self.refused[entry.id] = str(e)
                continue
            except InvalidEntryError as e:  # EntrySignatureError: forged or tampered
                raise MisbehavingPeerError(f"sent a forged entry: {e}") from e
            self.admitted.append(entry)
        return self._next()

    def _next(self) -> Message | None:
        if self._pending_buckets:
            self._state = _State.IDS
            return {"type": "ids_request", "buckets": list(self._pending_buckets)}
        if self._missing:
            self._state = _State.ENTRIES
            self._in_flight = self._missing[:MAX_ENTRIES_PER_REQUEST]
            del self._missing[:MAX_ENTRIES_PER_REQUEST]
            return {"type": "entries_request", "ids": [bytes.fromhex(i) for i in self._in_flight]}
        return self._finish()

    def _finish(self) -> Message | None:
        self._state = _State.DONE
        self._in_flight = []
        return None
