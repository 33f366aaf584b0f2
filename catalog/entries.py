"""Signed entries of the catalog's libraries (``os``, ``package``, ``image``, ``task``), sans-IO.

Schema. An entry's *body* is one msgpack map, and its ID is ``blake3(body).hexdigest()``::

    {"v": 1,                       # format version
     "kind": "os" | "package" | "image" | "task",
     "name": str,                  # [a-z0-9][a-z0-9.+_-]{0,63}  (Debian package names fit)
     "version": str,               # 1..64 of [A-Za-z0-9.+~:_-]  (Debian versions fit)
     "publisher": bin(32),         # raw Ed25519 public key
     "created_at": int,            # Unix seconds, from the injected wall clock
     "blobs": {str: str},          # role -> blob ID (64 lowercase hex), e.g. "kernel", "root"
     "meta": {str: value}}         # kind-specific fields, checked by the kind's validators

Canonical encoding (one byte string per entry, checked on decode): msgpack with
``use_bin_type``, every map's keys sorted (keys are ``str``; code-point order equals UTF-8 byte
order), integers in their shortest form (msgpack-python's only form), and **no floats anywhere**:
a float has several encodings (32/64 bit, NaN payloads, -0.0), so ``created_at`` is whole
seconds. ``meta`` values are None, bool, int (64-bit), str, bytes, lists and str-keyed maps,
nested at most :data:`MAX_META_DEPTH` deep; a body is at most :data:`MAX_BODY_SIZE` bytes.

The publisher signs ``DOMAIN + body`` with Ed25519. The signature is not part of the ID: the ID
names the content, and a copy whose signature was replaced is refused as forged, not stored as a
different entry. So changing any field changes the ID *and* breaks the signature.

An entry travels and is stored as :meth:`Entry.encode`: the msgpack array ``[body, signature]``.

Per-kind rules are a fixed table of validators, ``fn(entry) -> None`` raising
:class:`InvalidEntryError` (reported as :class:`EntryRuleError`, which replication treats as a
refusal, not as the sending peer's fault). Each kind needs the blobs it cannot do without
(``os``: ``kernel``, ``initrd`` and ``root``; ``package``: ``layer``; ``image``: ``manifest``;
``task`` nothing), and the ``meta`` keys the builds write must have their shape when present.

Trust: :class:`TrustPolicy` admits an entry only if its signature verifies and its publisher is
one of the keys the scheduler trusts (``bootstrap.toml`` + ``node.toml``), and says why not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3
import msgpack

from catalog.errors import (
    EntryRuleError,
    EntrySignatureError,
    InvalidEntryError,
    UntrustedPublisherError,
)
from node.identity import Identity, verify

FORMAT_VERSION = 1
DOMAIN = b"vmlend-catalog-entry/1\x00"
KINDS = ("os", "package", "image", "task")
MAX_BODY_SIZE = 64 * 1024
MAX_ENCODED_SIZE = MAX_BODY_SIZE + 128  # body + signature + array framing
MAX_BLOBS = 64
MAX_META_DEPTH = 8
MAX_META_ITEMS = 1024  # per list or map
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
ID_HEX_LEN = 64
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.+_-]{0,63}")
_VERSION_RE = re.compile(r"[A-Za-z0-9.+~:_-]{1,64}")
_BLOB_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_HEX_ID_RE = re.compile(r"[0-9a-f]{64}")
_BODY_KEYS = frozenset({"v", "kind", "name", "version", "publisher", "created_at", "blobs", "meta"})

KindValidator = Callable[["Entry"], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One signed catalog entry. Construct with :func:`make_entry` or :func:`decode_entry`.

    The constructor checks the fields' shapes and the kind's rules, never the signature: use
    :func:`check_signature` or :meth:`TrustPolicy.admit` for that.
    """

    kind: str
    name: str
    version: str
    publisher: bytes
    created_at: int
    blobs: Mapping[str, str]
    meta: Mapping[str, Any]
    signature: bytes
    _body: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Snapshot the maps: a caller mutating its dict afterwards must not change a signed entry.
        object.__setattr__(self, "blobs", dict(self.blobs))
        object.__setattr__(self, "meta", dict(self.meta))
        _check_fields(self)
        object.__setattr__(self, "_body", canonical_body(self))
        if len(self._body) > MAX_BODY_SIZE:
            raise InvalidEntryError(f"entry body of {len(self._body)} bytes > {MAX_BODY_SIZE}")
        if type(self.signature) is not bytes or len(self.signature) != SIGNATURE_SIZE:
            raise InvalidEntryError(f"signature must be {SIGNATURE_SIZE} bytes")
        for validator in _VALIDATORS.get(self.kind, ()):
            try:
                validator(self)
            except EntryRuleError:
                raise
            except InvalidEntryError as e:
                raise EntryRuleError(str(e)) from e

    @property
    def body(self) -> bytes:
        """The canonical bytes: what is signed and hashed."""
        return self._body

    @property
    def id(self) -> str:
        return entry_id(self._body)

    def encode(self) -> bytes:
        """The form entries travel and are stored in: msgpack ``[body, signature]``."""
        data: bytes = msgpack.packb([self._body, self.signature], use_bin_type=True)
        return data

    def to_dict(self) -> dict[str, Any]:
        """Fields for display and RPC (publisher and signature as hex)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "publisher": self.publisher.hex(),
            "created_at": self.created_at,
            "blobs": dict(self.blobs),
            "meta": dict(self.meta),
            "signature": self.signature.hex(),
        }


def entry_id(body: bytes) -> str:
    return str(blake3.blake3(body).hexdigest())


def canonical_body(entry: Entry) -> bytes:
    body = {
        "v": FORMAT_VERSION,
        "kind": entry.kind,
        "name": entry.name,
        "version": entry.version,
        "publisher": entry.publisher,
        "created_at": entry.created_at,
        "blobs": dict(entry.blobs),
        "meta": dict(entry.meta),
    }
    data: bytes = msgpack.packb(_sorted(body), use_bin_type=True)
    return data


def _sorted(value: Any) -> Any:
    """The value with every map's keys in sorted order (msgpack keeps dict insertion order)."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def make_entry(
    identity: Identity,
    *,
    kind: str,
    name: str,
    version: str,
    blobs: Mapping[str, str],
    meta: Mapping[str, Any] | None = None,
    now: float,
) -> Entry:
    """A new entry signed by ``identity``; ``now`` is the injected wall clock (Unix seconds)."""
    unsigned = Entry(
        kind=kind,
        name=name,
        version=version,
        publisher=identity.public_bytes,
        created_at=int(now),
        blobs=blobs,
        meta=meta or {},
        signature=bytes(SIGNATURE_SIZE),
    )
    return _with_signature(unsigned, identity.sign(DOMAIN + unsigned.body))


def _with_signature(entry: Entry, signature: bytes) -> Entry:
    return Entry(
        kind=entry.kind,
        name=entry.name,
        version=entry.version,
        publisher=entry.publisher,
        created_at=entry.created_at,
        blobs=entry.blobs,
        meta=entry.meta,
        signature=signature,
    )


def split_encoded(data: bytes) -> tuple[bytes, bytes]:
    """The ``(body, signature)`` of :meth:`Entry.encode` bytes, nothing else checked (so the ID
    of something that fails to decode can still be named: ``entry_id(body)``)."""
    if len(data) > MAX_ENCODED_SIZE:
        raise InvalidEntryError(f"encoded entry of {len(data)} bytes > {MAX_ENCODED_SIZE}")
    outer = _unpack(data, "entry")
    if not (
        isinstance(outer, list) and len(outer) == 2 and all(type(part) is bytes for part in outer)
    ):
        raise InvalidEntryError("an entry is the array [body, signature] of two byte strings")
    body, signature = outer
    return body, signature


def decode_entry(data: bytes) -> Entry:
    """Parse :meth:`Entry.encode` bytes, refusing anything malformed or non-canonical
    (:class:`InvalidEntryError`; :class:`EntryRuleError` if only a kind rule is broken).

    The signature is *not* checked here (see :func:`check_signature`)."""
    body, signature = split_encoded(data)
    entry = decode_body(body, signature)
    if entry.encode() != data:
        raise InvalidEntryError("entry is not canonically encoded")
    return entry


def decode_body(body: bytes, signature: bytes) -> Entry:
    """The entry whose canonical body is ``body``, carrying ``signature`` (not checked)."""
    if len(body) > MAX_BODY_SIZE:
        raise InvalidEntryError(f"entry body of {len(body)} bytes > {MAX_BODY_SIZE}")
    fields = _unpack(body, "entry body")
    if not isinstance(fields, dict):
        raise InvalidEntryError("entry body is not a map")
    if set(fields) != _BODY_KEYS:
        missing, extra = _BODY_KEYS - set(fields), set(fields) - _BODY_KEYS
        raise InvalidEntryError(
            f"entry body keys: missing {sorted(missing)}, extra {sorted(map(str, extra))}"
        )
    if fields["v"] != FORMAT_VERSION or type(fields["v"]) is not int:
        raise InvalidEntryError(f"unknown entry format version {fields['v']!r}")
    for key in ("blobs", "meta"):
        if not isinstance(fields[key], dict):
            raise InvalidEntryError(f"{key} must be a map")
    entry = Entry(
        kind=fields["kind"],
        name=fields["name"],
        version=fields["version"],
        publisher=fields["publisher"],
        created_at=fields["created_at"],
        blobs=fields["blobs"],
        meta=fields["meta"],
        signature=signature,
    )
    # Re-encoding must give the very same bytes: unsorted keys, duplicate keys, a string sent as
    # a longer-than-needed str16, anything that would give one entry two IDs is refused.
    if entry.body != body:
        raise InvalidEntryError("entry body is not canonically encoded")
    return entry


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_BODY_SIZE,
            max_bin_len=MAX_BODY_SIZE,
            max_array_len=MAX_META_ITEMS,
            max_map_len=MAX_META_ITEMS,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise InvalidEntryError(f"malformed {what}: {e}") from e


def _check_fields(entry: Entry) -> None:
    if entry.kind not in KINDS:
        raise InvalidEntryError(f"unknown entry kind {entry.kind!r} (one of {', '.join(KINDS)})")
    if not (isinstance(entry.name, str) and _NAME_RE.fullmatch(entry.name)):
        raise InvalidEntryError(f"bad entry name {entry.name!r} (want {_NAME_RE.pattern})")
    if not (isinstance(entry.version, str) and _VERSION_RE.fullmatch(entry.version)):
        raise InvalidEntryError(f"bad version {entry.version!r} (want {_VERSION_RE.pattern})")
    if type(entry.publisher) is not bytes or len(entry.publisher) != PUBLIC_KEY_SIZE:
        raise InvalidEntryError(f"publisher must be a {PUBLIC_KEY_SIZE}-byte Ed25519 key")
    if type(entry.created_at) is not int or not 0 <= entry.created_at < 2**63:
        raise InvalidEntryError(f"created_at must be whole Unix seconds, got {entry.created_at!r}")
    if len(entry.blobs) > MAX_BLOBS:
        raise InvalidEntryError(f"{len(entry.blobs)} blobs > {MAX_BLOBS}")
    for role, blob_id in entry.blobs.items():
        if not (isinstance(role, str) and _BLOB_ROLE_RE.fullmatch(role)):
            raise InvalidEntryError(f"bad blob role {role!r} (want {_BLOB_ROLE_RE.pattern})")
        if not (isinstance(blob_id, str) and _HEX_ID_RE.fullmatch(blob_id)):
            raise InvalidEntryError(f"blob {role!r}: {blob_id!r} is not 64 lowercase hex digits")
    _check_meta(entry.meta, "meta", 1)


def _check_meta(value: Any, path: str, depth: int) -> None:
    if depth > MAX_META_DEPTH:
        raise InvalidEntryError(f"{path}: nested deeper than {MAX_META_DEPTH} levels")
    if value is None or type(value) in (bool, str, bytes):
        return
    if type(value) is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidEntryError(f"{path}: integer out of 64-bit range")
        return
    if isinstance(value, list | tuple):
        if len(value) > MAX_META_ITEMS:
            raise InvalidEntryError(f"{path}: more than {MAX_META_ITEMS} items")
        for i, item in enumerate(value):
            _check_meta(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        if len(value) > MAX_META_ITEMS:
            raise InvalidEntryError(f"{path}: more than {MAX_META_ITEMS} items")
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEntryError(f"{path}: map keys must be strings, got {key!r}")
            _check_meta(item, f"{path}.{key}", depth + 1)
        return
    # Floats included: they have no single canonical encoding.
    raise InvalidEntryError(f"{path}: a {type(value).__name__} cannot be in an entry")


# ---- signatures and trust --------------------------------------------------------------------


def check_signature(entry: Entry) -> None:
    if not verify(entry.publisher, DOMAIN + entry.body, entry.signature):
        raise EntrySignatureError(
            f"entry {entry.id} ({entry.kind} {entry.name} {entry.version}): signature does not "
            f"verify under publisher {entry.publisher.hex()}"
        )


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """The publishers whose entries this scheduler accepts (raw 32-byte Ed25519 keys)."""

    trusted: frozenset[bytes]

    def __init__(self, trusted: Iterable[bytes]) -> None:
        object.__setattr__(self, "trusted", frozenset(trusted))

    def admit(self, entry: Entry) -> None:
        """Raise :class:`EntrySignatureError` (forged/tampered) or
        :class:`UntrustedPublisherError` (well signed, but not by anyone we trust)."""
        check_signature(entry)
        if entry.publisher not in self.trusted:
            raise UntrustedPublisherError(entry.publisher.hex())


# ---- per-kind validators ---------------------------------------------------------------------


def _requires_blobs(*roles: str) -> KindValidator:
    def check(entry: Entry) -> None:
        if missing := [r for r in roles if r not in entry.blobs]:
            raise InvalidEntryError(
                f"{entry.kind} entry {entry.name!r} lacks blob(s) {', '.join(missing)}"
            )

    return check


# What the builds put in ``meta``: lenient about entries made by other tools (a key that is
# absent is not checked), strict about the shape of a key that is there.
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_packages(entry: Entry) -> None:
    packages = entry.meta.get("packages")
    if packages is not None and not (
        isinstance(packages, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in packages.items())
    ):
        raise InvalidEntryError(
            f"{entry.kind} {entry.name}: meta.packages must map names to versions"
        )


def _check_image(entry: Entry) -> None:
    image_id = entry.meta.get("image_id")
    if image_id is not None and not (isinstance(image_id, str) and _HEX64.fullmatch(image_id)):
        raise InvalidEntryError(f"image {entry.name}: meta.image_id must be 64 hex digits")


# The rules of each kind, fixed: every node applies the same ones, whatever it has imported.
_VALIDATORS: dict[str, tuple[KindValidator, ...]] = {
    "os": (_requires_blobs("kernel", "initrd", "root"), _check_packages),
    "package": (_requires_blobs("layer"), _check_packages),
    "image": (_requires_blobs("manifest"), _check_image),
    "task": (),
}
