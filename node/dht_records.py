"""Signed, expiring DHT records in the ``/vmlend/`` namespace, sans-IO.

A record lives under the key ``/vmlend/<kind>/<owner>``, where ``<owner>`` is the libp2p peer ID of
the only key allowed to publish it. Its value is a msgpack map::

    {"v": 1, "key": str, "publisher": 32 raw Ed25519 bytes, "payload": msgpack bytes of a map,
     "issued_at": float, "expires_at": float, "sig": 64 bytes}

The signature covers the domain tag, the key, the publisher, the payload bytes and both times, so
a record cannot be tampered with, moved to another key, or kept alive past ``expires_at``. Times are
wall-clock seconds, injected by the caller (``clock``), never read here.

:class:`RecordValidator` is what every node registers for the ``vmlend`` namespace. Of several
valid records for one key it selects the one issued last. Anything invalid raises
:class:`InvalidRecordError`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from node.errors import RemoteProtocolError, VmlendError
from node.identity import Identity, verify

NAMESPACE = "vmlend"
VERSION = 1
MAX_RECORD_SIZE = 16 * 1024
MAX_TTL = 24 * 3600.0
MAX_CLOCK_SKEW = 300.0
_DOMAIN = b"vmlend-dht-record/1\x00"
_KIND_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p peer ID of an Ed25519 key: identity multihash (0x00, len 36) of the protobuf PublicKey
# {Type: Ed25519 (field 1 = 1), Data: 32 bytes (field 2)}.
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])

Clock = Callable[[], float]


class InvalidRecordError(RemoteProtocolError):
    """A DHT record is malformed, forged, tampered with, expired or under the wrong key."""


class RecordNotFoundError(VmlendError):
    """No valid record exists under the key (none stored, or every copy was invalid)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    kind: str
    owner: str  # the publisher's peer ID, also the last key segment
    publisher: bytes  # 32 raw Ed25519 public-key bytes
    payload: dict[str, Any]
    issued_at: float
    expires_at: float
    # True for a record this node holds from an earlier lookup, listed because the latest one
    # could not reach its publisher or the index in time (still signed and unexpired).
    stale: bool = False

    @property
    def key(self) -> str:
        return record_key(self.kind, self.owner)


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + "".join(reversed(out))


def peer_id_of(public_bytes: bytes) -> str:
    """The libp2p peer ID (base58 string) of a raw 32-byte Ed25519 public key."""
    if len(public_bytes) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _b58encode(_PEER_ID_PREFIX + public_bytes)


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        digit = _B58.find(ch)
        if digit < 0:
            raise ValueError(f"{text!r} is not base58")
        n = n * 58 + digit
    pad = len(text) - len(text.lstrip("1"))
    return b"\x00" * pad + n.to_bytes((n.bit_length() + 7) // 8, "big")


def public_key_of(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 key inside a peer ID (the inverse of :func:`peer_id_of`);
    ValueError if the ID is not base58 or holds no Ed25519 key."""
    raw = _b58decode(peer_id)
    if len(raw) != len(_PEER_ID_PREFIX) + 32 or not raw.startswith(_PEER_ID_PREFIX):
        raise ValueError(f"peer ID {peer_id!r} does not hold an Ed25519 key")
    return raw[len(_PEER_ID_PREFIX) :]


def check_kind(kind: str) -> str:
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"record kind {kind!r} must match {_KIND_RE.pattern}")
    return kind


def record_key(kind: str, owner: str) -> str:
    return f"/{NAMESPACE}/{check_kind(kind)}/{owner}"


def index_key(kind: str) -> str:
    """The provider key under which every publisher of ``kind`` announces itself (hex sha256)."""
    return hashlib.sha256(f"/{NAMESPACE}-index/{check_kind(kind)}".encode()).hexdigest()


def _signed_bytes(
    key: str, publisher: bytes, payload: bytes, issued: float, expires: float
) -> bytes:
    packed: bytes = msgpack.packb([key, publisher, payload, issued, expires], use_bin_type=True)
    return _DOMAIN + packed


def make_record(
    identity: Identity, kind: str, payload: Mapping[str, Any], *, ttl: float, now: float
) -> tuple[str, bytes]:
    """Sign ``payload`` as ``identity``'s record of ``kind``; return (DHT key, value bytes)."""
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be in (0, {MAX_TTL}]")
    publisher = identity.public_bytes
    key = record_key(kind, peer_id_of(publisher))
    body: bytes = msgpack.packb(dict(payload), use_bin_type=True)
    expires = now + ttl
    sig = identity.sign(_signed_bytes(key, publisher, body, now, expires))
    value: bytes = msgpack.packb(
        {
            "v": VERSION,
            "key": key,
            "publisher": publisher,
            "payload": body,
            "issued_at": now,
            "expires_at": expires,
            "sig": sig,
        },
        use_bin_type=True,
    )
    if len(value) > MAX_RECORD_SIZE:
        raise ValueError(f"record of {len(value)} bytes exceeds {MAX_RECORD_SIZE}")
    return key, value


def _field(obj: Mapping[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, typ) or isinstance(value, bool):
        raise InvalidRecordError(f"record field {name!r} missing or of the wrong type")
    return value


def _parse_key(key: str) -> tuple[str, str]:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] or parts[1] != NAMESPACE or not _KIND_RE.fullmatch(parts[2]):
        raise InvalidRecordError(f"key {key!r} is not /{NAMESPACE}/<kind>/<peer id>")
    return parts[2], parts[3]


def parse_record(key: str, value: bytes, *, now: float) -> Record:
    """Verify ``value`` as the record stored under ``key`` at wall-clock time ``now``."""
    if len(value) > MAX_RECORD_SIZE:
        raise InvalidRecordError(f"record of {len(value)} bytes exceeds {MAX_RECORD_SIZE}")
    kind, owner = _parse_key(key)
    try:
        obj = msgpack.unpackb(value, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise InvalidRecordError(f"record is not msgpack: {e}") from e
    if not isinstance(obj, dict):
        raise InvalidRecordError("record is not a map")
    if obj.get("v") != VERSION:
        raise InvalidRecordError(f"unknown record version {obj.get('v')!r}")
    if _field(obj, "key", str) != key:
        raise InvalidRecordError("record was signed for another key")
    publisher = _field(obj, "publisher", bytes)
    body = _field(obj, "payload", bytes)
    issued = float(_field(obj, "issued_at", (int, float)))
    expires = float(_field(obj, "expires_at", (int, float)))
    sig = _field(obj, "sig", bytes)
    if len(publisher) != 32 or peer_id_of(publisher) != owner:
        raise InvalidRecordError("record publisher does not own the key")
    if not verify(publisher, _signed_bytes(key, publisher, body, issued, expires), sig):
        raise InvalidRecordError("bad record signature")
    if not issued < expires <= issued + MAX_TTL:
        raise InvalidRecordError("record lifetime out of range")
    if issued > now + MAX_CLOCK_SKEW:
        raise InvalidRecordError("record issued in the future")
    if expires <= now:
        raise InvalidRecordError("record expired")
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise InvalidRecordError(f"record payload is not msgpack: {e}") from e
    if not isinstance(payload, dict):
        raise InvalidRecordError("record payload is not a map")
    return Record(
        kind=kind,
        owner=owner,
        publisher=publisher,
        payload=payload,
        issued_at=issued,
        expires_at=expires,
    )


class RecordValidator:
    """Validates and chooses among ``vmlend`` records (the shape of a libp2p Validator)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        parse_record(key, value, now=self._clock())

    def select(self, key: str, values: list[bytes]) -> int:
        """Index of the valid record issued last (ties: the first); invalid ones never win."""
        if not values:
            raise ValueError("no values to select from")
        now = self._clock()
        best, best_issued = 0, float("-inf")
        for i, value in enumerate(values):
            try:
                issued = parse_record(key, value, now=now).issued_at
            except InvalidRecordError:
                continue
            if issued > best_issued:
                best, best_issued = i, issued
        return best
