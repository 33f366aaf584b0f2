"""Messages of catalog anti-entropy (``/vmlend/catalog-sync/1.0.0``), as typed frozen dataclasses.

IDs are raw 32-byte entry IDs, grouped into 256 buckets by their first byte. One pull is a
dialogue on one stream (see :mod:`catalog.replication` for who sends what when)::

    puller -> SummaryRequest(root)          server <- InSync() | Summary(buckets: 256 hashes)
    puller -> IdsRequest(buckets)           server <- Ids(buckets: [[bucket, [id]]])
    puller -> EntriesRequest(ids)           server <- Entries(entries: [Entry.encode()])

They travel as msgpack maps in :mod:`node.wire` frames (both ends use :data:`WIRE_LIMITS`).
Building a message with a bad field raises :class:`LocalProtocolError` (our bug);
:func:`decode_request` and :func:`decode_reply` turn anything a peer sent that is malformed,
unknown, has extra or missing keys, or breaks a limit into :class:`MisbehavingPeerError`.

The limits bound what one peer can make us hold: an ``Ids`` reply lists at most
``MAX_IDS_PER_BUCKET`` IDs of one bucket and ``MAX_IDS_PER_REPLY`` in all. So a catalog is
replicated in full while no bucket holds more than ``MAX_IDS_PER_BUCKET`` entries (about a
million entries in all); past that a bucket's highest IDs are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from catalog.entries import MAX_ENCODED_SIZE
from node.errors import LocalProtocolError, RemoteProtocolError
from node.wire import Message, WireLimits
from node.wire_fields import as_bytes, as_int
from node.wire_message import MessageSet, tuple_of, wire

PROTOCOL_ID = "/vmlend/catalog-sync/1.0.0"
BUCKETS = 256
ID_SIZE = 32
HASH_SIZE = 32
MAX_IDS_PER_BUCKET = 4096
MAX_IDS_PER_REPLY = 16_384  # 32-byte IDs: ~0.6 MiB per frame
MAX_ENTRIES_PER_REQUEST = 32  # at most 32 x 64 KiB bodies: ~2 MiB per frame

WIRE_LIMITS = WireLimits(
    max_frame_size=MAX_ENTRIES_PER_REQUEST * (MAX_ENCODED_SIZE + 16) + 1024,
    max_depth=4,  # {"buckets": [[bucket, [id, ...]], ...]}
    max_items=MAX_IDS_PER_REPLY,
    max_str=64,
    max_bin=MAX_ENCODED_SIZE,
)


class MisbehavingPeerError(RemoteProtocolError):
    """The peer sent a forged, tampered, unrequested or malformed entry, or broke the protocol."""


def _id(value: object) -> bytes:
    return as_bytes("entry ID", value, ID_SIZE)


def _hash(value: object) -> bytes:
    return as_bytes("bucket hash", value, HASH_SIZE)


def _bucket(value: object) -> int:
    return as_int("bucket", value, 0, BUCKETS - 1)


def _encoded_entry(value: object) -> bytes:
    if type(value) is not bytes or len(value) > MAX_ENCODED_SIZE:
        raise LocalProtocolError(f"an encoded entry must be <= {MAX_ENCODED_SIZE} bytes")
    return value


def _distinct_buckets(buckets: tuple[int, ...]) -> None:
    for bucket in buckets:
        _bucket(bucket)
    if len(set(buckets)) != len(buckets):
        raise LocalProtocolError("bucket numbers must be distinct")


# ---- puller -> server --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SummaryRequest:
    """What the puller holds, as the root hash of its 256 bucket hashes."""

    TYPE: ClassVar[str] = "summary_request"
    root: bytes

    def __post_init__(self) -> None:
        _hash(self.root)


@dataclass(frozen=True, slots=True, kw_only=True)
class IdsRequest:
    """List the IDs of these buckets (those whose hashes differ from the puller's)."""

    TYPE: ClassVar[str] = "ids_request"
    buckets: tuple[int, ...] = field(metadata=wire(decode=tuple_of(_bucket, limit=BUCKETS)))

    def __post_init__(self) -> None:
        if not 0 < len(self.buckets) <= BUCKETS:
            raise LocalProtocolError(f"want 1..{BUCKETS} bucket numbers")
        _distinct_buckets(self.buckets)


@dataclass(frozen=True, slots=True, kw_only=True)
class EntriesRequest:
    TYPE: ClassVar[str] = "entries_request"
    ids: tuple[bytes, ...] = field(
        metadata=wire(decode=tuple_of(_id, limit=MAX_ENTRIES_PER_REQUEST))
    )

    def __post_init__(self) -> None:
        if not 0 < len(self.ids) <= MAX_ENTRIES_PER_REQUEST:
            raise LocalProtocolError(f"want 1..{MAX_ENTRIES_PER_REQUEST} entry IDs")
        for each in self.ids:
            _id(each)


Request = SummaryRequest | IdsRequest | EntriesRequest
REQUESTS: MessageSet[Request] = MessageSet(PROTOCOL_ID, SummaryRequest, IdsRequest, EntriesRequest)


# ---- server -> puller --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InSync:
    """The server's root equals the puller's: nothing to do."""

    TYPE: ClassVar[str] = "in_sync"


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """The server's 256 bucket hashes, in bucket order."""

    TYPE: ClassVar[str] = "summary"
    buckets: tuple[bytes, ...] = field(metadata=wire(decode=tuple_of(_hash, limit=BUCKETS)))

    def __post_init__(self) -> None:
        if len(self.buckets) != BUCKETS:
            raise LocalProtocolError(f"want {BUCKETS} bucket hashes")
        for each in self.buckets:
            _hash(each)


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketIds:
    """The IDs one bucket holds (travels as the pair ``[bucket, [id, ...]]``)."""

    bucket: int
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _bucket(self.bucket)
        if not isinstance(self.ids, tuple) or len(self.ids) > MAX_IDS_PER_BUCKET:
            raise LocalProtocolError(f"a bucket lists at most {MAX_IDS_PER_BUCKET} IDs")
        for each in self.ids:
            if _id(each)[0] != self.bucket:
                raise LocalProtocolError(f"{each.hex()} is not in bucket {self.bucket}")


def _bucket_ids(raw: object) -> BucketIds:
    if type(raw) is not list or len(raw) != 2:
        raise LocalProtocolError("each listed bucket must be [bucket, ids]")
    return BucketIds(bucket=raw[0], ids=tuple_of(_id, limit=MAX_IDS_PER_BUCKET)(raw[1]))


def _bucket_pairs(buckets: tuple[BucketIds, ...]) -> list[list[Any]]:
    return [[b.bucket, list(b.ids)] for b in buckets]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ids:
    """Some of the buckets asked for (a prefix that fits one reply), each with its IDs."""

    TYPE: ClassVar[str] = "ids"
    buckets: tuple[BucketIds, ...] = field(
        metadata=wire(decode=tuple_of(_bucket_ids, limit=BUCKETS), encode=_bucket_pairs)
    )

    def __post_init__(self) -> None:
        if not 0 < len(self.buckets) <= BUCKETS:
            raise LocalProtocolError(f"want 1..{BUCKETS} listed buckets")
        if not all(isinstance(b, BucketIds) for b in self.buckets):
            raise LocalProtocolError("each listed bucket must be a BucketIds")
        _distinct_buckets(tuple(b.bucket for b in self.buckets))
        if sum(len(b.ids) for b in self.buckets) > MAX_IDS_PER_REPLY:
            raise LocalProtocolError(f"a reply lists at most {MAX_IDS_PER_REPLY} IDs")


@dataclass(frozen=True, slots=True, kw_only=True)
class Entries:
    """``Entry.encode()`` of each entry asked for that the server holds (it may hold fewer)."""

    TYPE: ClassVar[str] = "entries"
    entries: tuple[bytes, ...] = field(
        metadata=wire(decode=tuple_of(_encoded_entry, limit=MAX_ENTRIES_PER_REQUEST))
    )

    def __post_init__(self) -> None:
        if len(self.entries) > MAX_ENTRIES_PER_REQUEST:
            raise LocalProtocolError(f"at most {MAX_ENTRIES_PER_REQUEST} entries per reply")
        for each in self.entries:
            _encoded_entry(each)


Reply = InSync | Summary | Ids | Entries
REPLIES: MessageSet[Reply] = MessageSet(PROTOCOL_ID, InSync, Summary, Ids, Entries)


def decode_request(raw: Message) -> Request:
    """A request a puller sent; :class:`MisbehavingPeerError` if it is not one."""
    try:
        return REQUESTS.decode(raw)
    except RemoteProtocolError as e:
        raise MisbehavingPeerError(str(e)) from None


def decode_reply(raw: Message) -> Reply:
    """A reply a server sent; :class:`MisbehavingPeerError` if it is not one."""
    try:
        return REPLIES.decode(raw)
    except RemoteProtocolError as e:
        raise MisbehavingPeerError(str(e)) from None
