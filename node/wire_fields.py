"""Strict field checks for decoding what a peer sent, shared by every typed message.

Each check returns the value it accepted or raises :class:`LocalProtocolError`; a message decoder
turns that into :class:`RemoteProtocolError` for what a peer sent. ``type(x) is int`` rather than
``isinstance``: a peer's ``True`` is not the number one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from node.errors import LocalProtocolError

MAX_TEXT = 512
MAX_SECONDS = 7 * 24 * 3600.0
# Task IDs and peer IDs: 1-128 characters of [A-Za-z0-9._:-], not starting with a symbol.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

T = TypeVar("T")


def as_int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def as_seconds(name: str, value: object, low_exclusive: float = 0.0) -> float:
    if type(value) not in (int, float) or not isinstance(value, int | float):
        raise LocalProtocolError(f"{name} must be a number of seconds")
    if not (math.isfinite(value) and low_exclusive < value <= MAX_SECONDS):
        raise LocalProtocolError(f"{name} must be seconds in ({low_exclusive}, {MAX_SECONDS}]")
    return float(value)


def as_bytes(name: str, value: object, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise LocalProtocolError(f"{name} must be {size} bytes")
    return value


def as_text(name: str, value: object, limit: int = MAX_TEXT) -> str:
    if type(value) is not str or len(value) > limit:
        raise LocalProtocolError(f"{name} must be a str of <= {limit} characters")
    return value


def as_id(name: str, value: object) -> str:
    if type(value) is not str or not ID_RE.fullmatch(value):
        raise LocalProtocolError(f"{name} must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def as_tuple(name: str, value: object, limit: int, item: Callable[[object], T]) -> tuple[T, ...]:
    if not isinstance(value, list | tuple) or len(value) > limit:
        raise LocalProtocolError(f"{name} must be a list of <= {limit} items")
    return tuple(item(v) for v in value)


def as_map(name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise LocalProtocolError(f"{name} must be a map")
    return value


def check_keys(
    kind: str, raw: Mapping[str, Any], required: set[str], optional: frozenset[str]
) -> None:
    given = set(raw)
    if not required <= given or not given <= required | optional:
        # A peer's keys may be bytes beside str (msgpack's strict_map_key allows both): named
        # as text, so they sort, and cut, so a long one does not fill the error.
        unexpected = sorted(str(k)[:64] for k in given - required - optional)
        raise LocalProtocolError(
            f"{kind}: missing {sorted(required - given)}, unexpected {unexpected[:16]}"
        )
