"""Messages of the chunk protocol (``/vmlend/chunks/1.0.0``), as typed frozen dataclasses.

They travel as msgpack maps in :mod:`node.wire` frames (use :data:`WIRE_LIMITS`). A fetcher asks a
provider for a blob's manifest and for which of its chunks it holds, then for chunks one request
each; every request carries a ``request_id`` the answer echoes, so several can be in flight on one
stream. Manifests and chunks verify themselves by hash, so nothing here is trusted for content:
the checks below are about shape and size.

Constructing a message with a bad field raises :class:`LocalProtocolError` (our bug);
:data:`MESSAGES` encodes them (``MESSAGES.encode``: the optional ``bitmap`` or ``positions`` left
out when unset) and turns anything a peer sent that is malformed, unknown, has extra or missing
keys, or breaks a limit into :class:`RemoteProtocolError` (``MESSAGES.decode``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from catalog.blob import MAX_BLOB_CHUNKS, MAX_MANIFEST_SIZE, BlobId, BlobStore
from catalog.chunking import ID_SIZE, MAX_CHUNK_SIZE, ChunkId
from catalog.errors import ChunkCorruptError, MissingChunkError, UnknownBlobError
from node.errors import LocalProtocolError
from node.wire import WireLimits
from node.wire_message import MessageSet, enum_of, wire

PROTOCOL_ID = "/vmlend/chunks/1.0.0"
MAX_REQUEST_ID = 2**63 - 1
MAX_ERROR_TEXT = 512
MAX_POSITIONS = 4096
"""A have-list longer than this is sent as a bitmap (at most MAX_BLOB_CHUNKS / 8 bytes)."""

WIRE_LIMITS = WireLimits(
    max_frame_size=MAX_CHUNK_SIZE + 64 * 1024,  # one whole chunk plus the map around it
    max_bin=MAX_CHUNK_SIZE,
    max_items=MAX_POSITIONS + 16,
    max_str=MAX_ERROR_TEXT * 4,
    max_depth=4,
)


class ErrorCode(StrEnum):
    NOT_FOUND = "not_found"  # the chunk is not (or no longer) here
    UNKNOWN_BLOB = "unknown_blob"
    BUSY = "busy"  # over our per-peer limits; try later or elsewhere
    BAD_REQUEST = "bad_request"
    UNAUTHORISED = "unauthorised"
    INTERNAL = "internal"


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def _check_bytes(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not bytes or not low <= len(value) <= high:
        size = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise LocalProtocolError(f"{name} must be {low}..{high} bytes, got {size}")


def _check_id(name: str, value: object) -> None:
    _check_bytes(name, value, ID_SIZE, ID_SIZE)


def _positions(raw: object) -> tuple[object, ...]:
    """A have-list as sent; HaveResponse checks each position against ``chunk_count``."""
    if type(raw) is not list or len(raw) > MAX_POSITIONS:
        raise LocalProtocolError(f"positions must be a list of <= {MAX_POSITIONS}")
    return tuple(raw)


@dataclass(frozen=True, slots=True, kw_only=True)
class HaveRequest:
    """Which chunks of ``blob_id`` do you hold?"""

    TYPE: ClassVar[str] = "have_request"
    request_id: int
    blob_id: bytes

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)
        _check_id("blob_id", self.blob_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class HaveResponse:
    """The positions (indices into the manifest's chunk list) the provider can serve.

    Exactly one of ``bitmap`` (bit ``i`` is ``bitmap[i // 8] >> (i % 8) & 1``, unused high bits
    zero) or ``positions`` (sorted, distinct) is set; :meth:`build` picks the smaller.
    """

    TYPE: ClassVar[str] = "have_response"
    request_id: int
    blob_id: bytes
    chunk_count: int
    bitmap: bytes | None = field(default=None, metadata=wire(optional=True))
    positions: tuple[int, ...] | None = field(
        default=None, metadata=wire(decode=_positions, encode=list, optional=True)
    )

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)
        _check_id("blob_id", self.blob_id)
        _check_int("chunk_count", self.chunk_count, 0, MAX_BLOB_CHUNKS)
        if (self.bitmap is None) == (self.positions is None):
            raise LocalProtocolError("exactly one of bitmap and positions must be set")
        if self.bitmap is not None:
            size = (self.chunk_count + 7) // 8
            _check_bytes("bitmap", self.bitmap, size, size)
            spare = self.chunk_count % 8
            if spare and self.bitmap[-1] >> spare:
                raise LocalProtocolError("bitmap has bits set past chunk_count")
        if self.positions is not None:
            if type(self.positions) is not tuple or len(self.positions) > MAX_POSITIONS:
                raise LocalProtocolError(f"positions must be a tuple of <= {MAX_POSITIONS}")
            previous = -1
            for position in self.positions:
                _check_int("position", position, previous + 1, self.chunk_count - 1)
                previous = position

    @classmethod
    def build(
        cls, *, request_id: int, blob_id: bytes, chunk_count: int, positions: Iterable[int]
    ) -> HaveResponse:
        ordered = tuple(sorted(set(positions)))
        if len(ordered) <= min(MAX_POSITIONS, chunk_count // 32):
            return cls(
                request_id=request_id, blob_id=blob_id, chunk_count=chunk_count, positions=ordered
            )
        bitmap = bytearray((chunk_count + 7) // 8)
        for position in ordered:
            if not 0 <= position < chunk_count:
                raise LocalProtocolError(f"position {position} out of range")
            bitmap[position // 8] |= 1 << (position % 8)
        return cls(
            request_id=request_id, blob_id=blob_id, chunk_count=chunk_count, bitmap=bytes(bitmap)
        )

    def held(self) -> list[int]:
        """The positions held, ascending, whichever encoding was used."""
        if self.positions is not None:
            return list(self.positions)
        assert self.bitmap is not None
        return [i for i in range(self.chunk_count) if self.bitmap[i // 8] >> (i % 8) & 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestRequest:
    TYPE: ClassVar[str] = "manifest_request"
    request_id: int
    blob_id: bytes

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)
        _check_id("blob_id", self.blob_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestResponse:
    """The blob's canonical manifest bytes; the receiver checks they hash to ``blob_id``."""

    TYPE: ClassVar[str] = "manifest_response"
    request_id: int
    blob_id: bytes
    manifest: bytes

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)
        _check_id("blob_id", self.blob_id)
        _check_bytes("manifest", self.manifest, 1, MAX_MANIFEST_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRequest:
    TYPE: ClassVar[str] = "chunk_request"
    request_id: int
    chunk_id: bytes

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)
        _check_id("chunk_id", self.chunk_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkResponse:
    """The chunk's bytes; the receiver checks they hash to ``chunk_id`` (the plan does)."""

    TYPE: ClassVar[str] = "chunk_response"
    request_id: int
    chunk_id: bytes
    data: bytes

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)
        _check_id("chunk_id", self.chunk_id)
        _check_bytes("data", self.data, 1, MAX_CHUNK_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest:
    """The fetcher no longer wants the answer to ``request_id`` (it came from elsewhere)."""

    TYPE: ClassVar[str] = "cancel"
    request_id: int

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorResponse:
    TYPE: ClassVar[str] = "error"
    request_id: int
    code: ErrorCode = field(metadata=wire(decode=enum_of(ErrorCode)))
    message: str = ""

    def __post_init__(self) -> None:
        _check_int("request_id", self.request_id, 0, MAX_REQUEST_ID)
        if not isinstance(self.code, ErrorCode):
            raise LocalProtocolError(f"code must be an ErrorCode, got {self.code!r}")
        if type(self.message) is not str or len(self.message) > MAX_ERROR_TEXT:
            raise LocalProtocolError(f"message must be a str of <= {MAX_ERROR_TEXT} characters")


Message = (
    HaveRequest
    | HaveResponse
    | ManifestRequest
    | ManifestResponse
    | ChunkRequest
    | ChunkResponse
    | CancelRequest
    | ErrorResponse
)
MESSAGES: MessageSet[Message] = MessageSet(
    PROTOCOL_ID,
    HaveRequest,
    HaveResponse,
    ManifestRequest,
    ManifestResponse,
    ChunkRequest,
    ChunkResponse,
    CancelRequest,
    ErrorResponse,
)


Request = HaveRequest | ManifestRequest | ChunkRequest


async def respond(blobs: BlobStore, request: Request) -> Message:
    """The provider's answer to one request, from the local store (the trio glue sends it).

    Failures a peer may cause or meet are answers, not exceptions: unknown blob, a chunk that is
    not (or no longer, e.g. found corrupt and quarantined) here. Authorisation is the glue's.
    """
    rid = request.request_id
    try:
        if isinstance(request, ChunkRequest):
            data = await blobs.chunks.get(ChunkId(request.chunk_id), verify=True)
            return ChunkResponse(request_id=rid, chunk_id=request.chunk_id, data=data)
        manifest = await blobs.manifest(BlobId(request.blob_id))
        if isinstance(request, ManifestRequest):
            return ManifestResponse(
                request_id=rid, blob_id=request.blob_id, manifest=manifest.encoded
            )
        held = await blobs.have_positions(manifest.blob_id)
        count = len(manifest.chunks)
        return HaveResponse.build(
            request_id=rid, blob_id=request.blob_id, chunk_count=count, positions=held
        )
    except UnknownBlobError:
        return ErrorResponse(request_id=rid, code=ErrorCode.UNKNOWN_BLOB)
    except (MissingChunkError, ChunkCorruptError):
        return ErrorResponse(request_id=rid, code=ErrorCode.NOT_FOUND)
