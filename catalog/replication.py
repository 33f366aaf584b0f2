"""Catalog anti-entropy between schedulers (``/vmlend/catalog-sync/1.0.0``), sans-IO.

Pull only: a scheduler asks a peer what it has and fetches what it lacks; the peer never pushes.
IDs are grouped into 256 buckets by their first byte. A bucket's hash is blake3 of its sorted raw
IDs, the root is blake3 of the 256 bucket hashes. One pull, as messages on one stream (the
messages are in :mod:`catalog.replication_messages`)::

    puller -> SummaryRequest(root)
    server <- InSync()                   # same root: done
            | Summary(buckets)           # the 256 bucket hashes
    puller -> IdsRequest(buckets)        # the buckets whose hashes differ
    server <- Ids(buckets)               # a prefix of them that fits a reply, with their IDs
    ...      (until every differing bucket is listed, or MAX_WANTED_PER_SESSION IDs are wanted)
    puller -> EntriesRequest(ids)        # at most MAX_ENTRIES_PER_REQUEST
    server <- Entries(entries)           # Entry.encode() of each it holds
    ...      (until every wanted ID was asked for), then the puller ends the stream.

A pull wants at most ``MAX_WANTED_PER_SESSION`` IDs, so a peer that lists millions of IDs costs
the puller a bounded amount of memory; a larger gap is closed by the next pulls, each of which
finds what the previous one stored.

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

import blake3

from catalog.entries import Entry, TrustPolicy, decode_entry, entry_id, split_encoded
from catalog.errors import EntryRuleError, InvalidEntryError, UntrustedPublisherError
from catalog.replication_messages import (
    BUCKETS,
    ID_SIZE,
    MAX_ENTRIES_PER_REQUEST,
    MAX_IDS_PER_BUCKET,
    MAX_IDS_PER_REPLY,
    BucketIds,
    Entries,
    EntriesRequest,
    Ids,
    IdsRequest,
    InSync,
    MisbehavingPeerError,
    Reply,
    Request,
    Summary,
    SummaryRequest,
)
from node.errors import LocalProtocolError

MAX_MESSAGES_PER_SESSION = 10_000  # per stream (~320k entries): bounds what one peer costs us
MAX_WANTED_PER_SESSION = 8192  # IDs one pull may hold as wanted: ~1 MiB of hex strings

_EMPTY_BUCKET = blake3.blake3(b"").digest()


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


# ---- the serving side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WantEntries:
    """The glue must load these entries (hex IDs) and answer with :func:`entries_reply`."""

    ids: list[str]


def respond(request: Request, index: IdIndex) -> Reply | WantEntries:
    """The answer to one request from a puller."""
    if isinstance(request, SummaryRequest):
        if request.root == index.root():
            return InSync()
        return Summary(buckets=tuple(index.bucket_hashes()))
    if isinstance(request, IdsRequest):
        served: list[BucketIds] = []
        total = 0
        for bucket in request.buckets:
            # Always serve at least one bucket so a pull progresses; later buckets wait for the
            # next request.
            ids = index.bucket_ids(bucket)[:MAX_IDS_PER_BUCKET]
            if served and total + len(ids) > MAX_IDS_PER_REPLY:
                break
            served.append(BucketIds(bucket=bucket, ids=tuple(ids)))
            total += len(ids)
        return Ids(buckets=tuple(served))
    return WantEntries([raw.hex() for raw in request.ids])


def entries_reply(encoded: Sequence[bytes]) -> Entries:
    return Entries(entries=tuple(encoded))


# ---- the pulling side ------------------------------------------------------------------------


class _State(Enum):
    IDLE = auto()
    SUMMARY = auto()
    IDS = auto()
    ENTRIES = auto()
    DONE = auto()


@dataclass(slots=True)
class PullSession:
    """One pull from one peer. ``start()``, then feed each decoded reply to ``receive()`` and
    send what it returns until it returns None. Afterwards ``admitted`` holds the entries to
    insert (each decoded, hash-checked, signature-checked and trusted) and ``refused`` maps the
    IDs of well-signed entries from untrusted publishers to the reason. ``skip``: IDs not to
    fetch (refused before). At most ``max_wanted`` IDs are wanted in one pull."""

    local: IdIndex
    policy: TrustPolicy
    skip: Container[str] = frozenset()
    max_wanted: int = MAX_WANTED_PER_SESSION
    admitted: list[Entry] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    _state: _State = _State.IDLE
    _pending_buckets: list[int] = field(default_factory=list)
    _missing: list[str] = field(default_factory=list)
    _wanted: set[str] = field(default_factory=set)  # every ID this pull has asked or will ask for
    _in_flight: list[str] = field(default_factory=list)  # IDs of the entries_request out

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def wanted(self) -> int:
        """How many IDs this pull has wanted so far (at most ``max_wanted``)."""
        return len(self._wanted)

    def start(self) -> SummaryRequest:
        if self._state is not _State.IDLE:
            raise LocalProtocolError("a pull session starts once")
        self._state = _State.SUMMARY
        return SummaryRequest(root=self.local.root())

    def receive(self, reply: Reply) -> Request | None:
        """The next request to send, or None when the pull is complete."""
        if self._state is _State.SUMMARY and isinstance(reply, InSync):
            self._finish()
            return None
        if self._state is _State.SUMMARY and isinstance(reply, Summary):
            return self._on_summary(reply)
        if self._state is _State.IDS and isinstance(reply, Ids):
            return self._on_ids(reply)
        if self._state is _State.ENTRIES and isinstance(reply, Entries):
            return self._on_entries(reply)
        if self._state in (_State.IDLE, _State.DONE):
            raise LocalProtocolError(f"receive() in state {self._state.name}")
        raise MisbehavingPeerError(
            f"unexpected {reply.TYPE} while waiting for {self._state.name.lower()}"
        )

    def _on_summary(self, summary: Summary) -> Request | None:
        self._pending_buckets = [
            b for b, h in enumerate(summary.buckets) if h != self.local.bucket_hash(b)
        ]
        return self._next()

    def _on_ids(self, ids: Ids) -> Request | None:
        for listed in ids.buckets:
            if listed.bucket not in self._pending_buckets:
                raise MisbehavingPeerError(f"ids: bucket {listed.bucket} was not asked for")
            self._pending_buckets.remove(listed.bucket)
            for raw in listed.ids:
                if len(self._wanted) >= self.max_wanted:
                    break  # the rest waits for a later pull, once these are stored
                wanted = raw.hex()
                if wanted in self.local or wanted in self.skip or wanted in self._wanted:
                    continue
                self._wanted.add(wanted)
                self._missing.append(wanted)
        return self._next()

    def _on_entries(self, reply: Entries) -> Request | None:
        if len(reply.entries) > len(self._in_flight):
            raise MisbehavingPeerError("entries: more entries than were asked for")
        seen: set[str] = set()
        for data in reply.entries:
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

    def _next(self) -> Request | None:
        if self._pending_buckets and len(self._wanted) < self.max_wanted:
            self._state = _State.IDS
            return IdsRequest(buckets=tuple(self._pending_buckets))
        self._pending_buckets = []
        if self._missing:
            self._state = _State.ENTRIES
            self._in_flight = self._missing[:MAX_ENTRIES_PER_REQUEST]
            del self._missing[:MAX_ENTRIES_PER_REQUEST]
            return EntriesRequest(ids=tuple(bytes.fromhex(i) for i in self._in_flight))
        self._finish()
        return None

    def _finish(self) -> None:
        self._state = _State.DONE
        self._in_flight = []
