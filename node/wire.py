"""Length-prefixed msgpack frames, sans-IO.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack: one map with a string
``type`` key. Every limit is explicit and a constructor argument; anything that breaks one is a
:class:`RemoteProtocolError` on receive and a :class:`LocalProtocolError` on send, never a crash
or a hang. The trio code that moves these bytes lives elsewhere (``node.p2p``, ``node.rpc_server``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import compress
from typing import Any

import msgpack

from node.errors import LocalProtocolError, RemoteProtocolError

_LENGTH = struct.Struct(">I")
HEADER_SIZE = _LENGTH.size

Message = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class WireLimits:
    max_frame_size: int = 4 * 1024 * 1024
    max_depth: int = 16
    max_items: int = 65_536  # per array or map
    max_str: int = 1024 * 1024
    max_bin: int = 4 * 1024 * 1024


DEFAULT_LIMITS = WireLimits()


_CONTAINERS = frozenset({dict, list, tuple})
_IS_CONTAINER = _CONTAINERS.__contains__


def too_deep(obj: object, max_depth: int) -> bool:
    """True if ``obj`` nests maps/arrays deeper than ``max_depth`` levels.

    Level by level, never recursing, so a hostile nesting cannot blow the Python stack; and the
    scalars of each level are skipped in C (``map``/``compress``), so the check costs a fraction
    of what decoding the frame did rather than many times it. Keys are not searched: both
    decoders use ``strict_map_key``, so they are strings or bytes. Shared with the local RPC
    decoder, which reports the same condition with its own error type.
    """
    level = [obj] if type(obj) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        below: list[object] = []
        for item in level:
            values: Any = item.values() if type(item) is dict else item
            below.extend(compress(values, map(_IS_CONTAINER, map(type, values))))
        level = below
    return False


def decode_body(body: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Decode one frame body into a message map, enforcing every limit."""
    if len(body) > limits.max_frame_size:
        raise RemoteProtocolError(f"frame of {len(body)} bytes exceeds {limits.max_frame_size}")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        # msgpack reports truncation, garbage, oversize and ext types through these.
        raise RemoteProtocolError(f"malformed msgpack frame: {e}") from e
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"frame is a {type(obj).__name__}, expected a map")
    if not isinstance(obj.get("type"), str):
        raise RemoteProtocolError("message has no string 'type' field")
    if too_deep(obj, limits.max_depth):
        raise RemoteProtocolError(f"message nested deeper than {limits.max_depth} levels")
    return obj


def encode_body(msg: Message, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    if not isinstance(msg.get("type"), str):
        raise LocalProtocolError("message has no string 'type' field")
    try:
        body: bytes = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError(f"message cannot be encoded: {e}") from e
    if len(body) > limits.max_frame_size:
        raise LocalProtocolError(f"message of {len(body)} bytes exceeds {limits.max_frame_size}")
    return body


def encode_frame(msg: Message, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    body = encode_body(msg, limits)
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Feed it bytes as they arrive; take whole messages out.

    After a :class:`RemoteProtocolError` the decoder is poisoned: the stream it reads is no longer
    in sync, so the caller must drop the connection.
    """

    def __init__(self, limits: WireLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._error: RemoteProtocolError | None = None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (an EOF here cut no message in half)."""
        return not self._buffer

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_message(self) -> Message | None:
        if self._error is not None:
            raise self._error
        if len(self._buffer) < HEADER_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        try:
            if length == 0:
                raise RemoteProtocolError("empty frame")
            if length > self._limits.max_frame_size:
                raise RemoteProtocolError(
                    f"frame length {length} exceeds {self._limits.max_frame_size}"
                )
            if len(self._buffer) < HEADER_SIZE + length:
                return None
            body = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
            del self._buffer[: HEADER_SIZE + length]
            return decode_body(body, self._limits)
        except RemoteProtocolError as e:
            self._error = e
            raise
