"""One typed message layer for the protocols: frozen dataclasses, checked when built, decoded here.

A protocol declares each message as a frozen dataclass with a ``TYPE`` class variable and checks
its fields in ``__post_init__`` (raising :class:`LocalProtocolError`), then lists its messages in a
:class:`MessageSet`. :meth:`MessageSet.encode` gives the msgpack-ready map with its ``type``;
:meth:`MessageSet.decode` turns a map a peer sent into one of the messages or raises
:class:`RemoteProtocolError`: an unknown type, a missing or unexpected key, a field of the wrong
shape. Nothing downstream indexes a peer's raw map.

A field whose wire form is not its Python value says how to convert in its metadata, with
:func:`wire` (``field(metadata=wire(decode=tuple_of(as_id)))``): nested records, enums, tuples.
An ``optional`` field may be missing from the map (its default is taken) and is left out when
``None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Generic, TypeVar

from node.errors import LocalProtocolError, RemoteProtocolError

T = TypeVar("T")
M = TypeVar("M")

Decode = Callable[[Any], Any]
Encode = Callable[[Any], Any]


def wire(
    *, decode: Decode | None = None, encode: Encode | None = None, optional: bool = False
) -> dict[str, Any]:
    """Field metadata: how the field's value travels (see the module docstring)."""
    return {"wire": (decode, encode, optional)}


def _hooks(field: dataclasses.Field[Any]) -> tuple[Decode | None, Encode | None, bool]:
    hooks: tuple[Decode | None, Encode | None, bool] = field.metadata.get(
        "wire", (None, None, False)
    )
    return hooks


def encode_value(value: Any) -> Any:
    """The default wire form: records as maps, tuples and sets as lists, enums as values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode_record(value)
    if isinstance(value, tuple | list):
        return [encode_value(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(encode_value(v) for v in value)
    if isinstance(value, Enum):
        return value.value
    return value


def encode_record(record: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        _, encode, optional = _hooks(field)
        if optional and value is None:
            continue
        out[field.name] = encode(value) if encode is not None else encode_value(value)
    return out


def decode_record(cls: type[T], raw: object) -> T:
    """A record (a dataclass) from its map; :class:`LocalProtocolError` if it does not fit."""
    if not isinstance(raw, dict):
        raise LocalProtocolError(f"{cls.__name__} must be a map")
    values: dict[str, Any] = {}
    seen = 0
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        decode, _, optional = _hooks(field)
        if field.name not in raw:
            if optional:
                continue
            raise LocalProtocolError(f"{cls.__name__}: missing {field.name!r}")
        seen += 1
        value = raw[field.name]
        values[field.name] = decode(value) if decode is not None else value
    if seen != len(raw):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unexpected = sorted(str(k)[:64] for k in raw if k not in known)
        raise LocalProtocolError(f"{cls.__name__}: unexpected {unexpected}")
    return cls(**values)


def record(cls: type[T]) -> Callable[[object], T]:
    """A decode hook for a nested record."""
    return lambda raw: decode_record(cls, raw)


def tuple_of(item: Callable[[object], T], *, limit: int) -> Callable[[object], tuple[T, ...]]:
    """A decode hook for a list of at most ``limit`` items, each decoded by ``item``."""

    def decode(raw: object) -> tuple[T, ...]:
        if not isinstance(raw, list) or len(raw) > limit:
            raise LocalProtocolError(f"expected a list of at most {limit} items")
        return tuple(item(v) for v in raw)

    return decode


def enum_of(cls: type[T]) -> Callable[[object], T]:
    """A decode hook for an enum's value."""

    def decode(raw: object) -> T:
        try:
            return cls(raw)  # type: ignore[call-arg]
        except ValueError:
            raise LocalProtocolError(f"{str(raw)[:64]!r} is not a {cls.__name__}") from None

    return decode


class MessageSet(Generic[M]):
    """The messages one protocol (or one direction of it) may carry, by their ``TYPE``."""

    def __init__(self, protocol: str, *classes: type[M]) -> None:
        self.protocol = protocol
        self._types: dict[str, type[M]] = {}
        for cls in classes:
            kind = cls.TYPE  # type: ignore[attr-defined]
            if kind in self._types:
                raise ValueError(f"{protocol}: two messages of type {kind!r}")
            self._types[kind] = cls

    def encode(self, message: M) -> dict[str, Any]:
        if self._types.get(message.TYPE) is not type(message):  # type: ignore[attr-defined]
            raise LocalProtocolError(f"{type(message).__name__} is not a {self.protocol} message")
        return {"type": message.TYPE, **encode_record(message)}  # type: ignore[attr-defined]

    def decode(self, raw: Mapping[str, Any]) -> M:
        kind = raw.get("type") if isinstance(raw, dict) else None
        cls = self._types.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise RemoteProtocolError(f"{self.protocol}: unknown message type {str(kind)[:64]!r}")
        body = {k: v for k, v in raw.items() if k != "type"}
        try:
            return decode_record(cls, body)
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"{self.protocol} {kind}: {e}") from None
        except (TypeError, ValueError) as e:  # a hook met a value of the wrong shape
            raise RemoteProtocolError(f"{self.protocol} {kind}: malformed: {e}") from None
