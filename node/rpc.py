"""Local RPC protocol: standard MessagePack-RPC over a byte stream, sans-IO.

The messages are the three arrays of the MessagePack-RPC spec, written back to back with no length
prefix (the spec has none)::

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]
    notification  [2, method, params]

``msgid`` is a uint32, ``method`` a str (a UTF-8 bin is accepted too: some clients, such as
those written for Neovim, send one), ``params`` an array. ``error`` is nil or, from our server,
a map ``{"code": <stable name>, "message": <text>}``.

Two small conventions on top of the spec, both expressed in standard messages:

* Streaming: a handler may send notifications before its response. So that concurrent calls on one
  connection are not confused, such notifications carry the request's msgid first:
  ``[2, method, [msgid, *params]]``; :class:`ClientConnection` strips it and reports the msgid.
* Cancelling: a client that gives up on a call sends the notification ``["rpc.cancel", [msgid]]``;
  the server cancels that handler and answers the request with the error code ``cancelled``.

Errors say whose fault they are. :class:`StreamCorruptError`: the bytes are not a msgpack stream
within our limits, the connection is out of sync and must be closed. :class:`RejectedMessageError`
and its subclasses: one well-formed msgpack object is not an acceptable message; the stream is
still in sync, and when ``msgid`` could be recovered the server answers it with ``code``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from node.errors import LocalProtocolError, RemoteProtocolError
from node.wire import too_deep

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MSGID = 2**32 - 1
CANCEL_METHOD = "rpc.cancel"
# Sent by a server that refuses a connection (too many, wrong uid) just before closing it.
CLOSING_METHOD = "rpc.closing"

# Stable error codes; handlers may raise RpcError with codes of their own as well.
METHOD_NOT_FOUND = "method_not_found"
INVALID_PARAMS = "invalid_params"
INVALID_REQUEST = "invalid_request"
INTERNAL = "internal"
BUSY = "busy"
CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcLimits:
    # One encoded message may not exceed this many bytes, in either direction.
    max_message_size: int = 8 * 1024 * 1024
    max_depth: int = 32
    max_items: int = 65_536  # per array or map
    max_str: int = 4 * 1024 * 1024
    max_bin: int = 8 * 1024 * 1024
    max_in_flight: int = 64  # requests per connection awaiting their response


DEFAULT_LIMITS = RpcLimits()
_FEED_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    msgid: int
    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: list[Any]
    # For a streaming call's notifications, the msgid of that call (our convention), else None.
    msgid: int | None = None


@dataclass(frozen=True, slots=True)
class Response:
    msgid: int
    error: Any
    result: Any


class StreamCorruptError(RemoteProtocolError):
    """The peer's bytes are not a msgpack stream within our limits; close the connection."""


class RejectedMessageError(RemoteProtocolError):
    """One decoded message is not acceptable; the stream itself is still in sync."""

    code = INVALID_REQUEST

    def __init__(self, message: str, *, msgid: int | None = None) -> None:
        super().__init__(message)
        self.msgid = msgid


class BadShapeError(RejectedMessageError):
    """Not an array, or an array of the wrong length for its kind."""


class BadTypeError(RejectedMessageError):
    """A field has the wrong type (method not a str, params not an array, ...)."""


class BadMsgidError(RejectedMessageError):
    """The msgid is not a uint32, or is already in flight (answers would be ambiguous)."""


class UnusableNotificationError(RejectedMessageError):
    """A notification we cannot use (a method that is no text, params that are no array); it
    asks for no answer, so it is ignored and the connection kept."""


class UnknownKindError(RejectedMessageError):
    """The first element is not a kind this side accepts."""


class BusyError(RejectedMessageError):
    """Too many requests are already in flight on this connection."""

    code = BUSY


def error_object(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _method_name(value: object) -> str | None:
    """A method given as str, or as bin holding UTF-8 (liberal in what we accept)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _is_msgid(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_MSGID


class _Connection:
    """What both sides share: the limited unpacker, the packer, poisoning after a stream error."""

    def __init__(self, limits: RpcLimits) -> None:
        self.limits = limits
        self._unpacker = self._new_unpacker()
        # Bytes received but not yet given to the unpacker: it is fed only when it needs more and
        # never past the message limit, so it holds at most ``max_message_size`` bytes.
        self._pending = bytearray()
        self._fed = 0  # bytes given to the unpacker so far
        self._message_start = 0  # stream offset where the message being decoded starts
        self._error: StreamCorruptError | None = None

    def _new_unpacker(self) -> msgpack.Unpacker:
        lim = self.limits
        return msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_buffer_size=lim.max_message_size,
            max_str_len=lim.max_str,
            max_bin_len=lim.max_bin,
            max_array_len=lim.max_items,
            max_map_len=lim.max_items,
            max_ext_len=0,
        )

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; call :meth:`next_event` until None before adding more.

        ``b""`` is not special here: the glue handles the end of the stream.
        """
        if self._error is not None:
            raise self._error
        self._pending += data

    def _next_object(self) -> tuple[bool, Any]:
        """(True, obj) for the next whole msgpack object, (False, None) if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            while True:
                try:
                    obj = self._unpacker.unpack()
                except msgpack.OutOfData:
                    if not self._pending:
                        return False, None
                    self._feed_some()
                    continue
                self._message_start = self._unpacker.tell()
                if too_deep(obj, self.limits.max_depth):
                    raise StreamCorruptError(
                        f"message nested deeper than {self.limits.max_depth} levels"
                    )
                return True, obj
        except StreamCorruptError as e:
            self._error = e
            raise
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            # msgpack reports garbage, oversize fields and ext types through these.
            self._error = StreamCorruptError(f"malformed msgpack stream: {e}")
            raise self._error from e

    def _feed_some(self) -> None:
        # The unpacker's max_buffer_size alone does not bound a message: it drops the bytes of
        # what it has parsed, so an array of many big strings would pass. Count every byte fed
        # since the end of the last whole message instead, and never feed past the limit.
        used = self._fed - self._message_start
        room = self.limits.max_message_size - used
        if room <= 0:
            raise StreamCorruptError(f"message exceeds {self.limits.max_message_size} bytes")
        chunk = bytes(self._pending[: min(room, _FEED_CHUNK)])
        self._unpacker.feed(chunk)
        del self._pending[: len(chunk)]
        self._fed += len(chunk)

    def _pack(self, obj: list[Any]) -> bytes:
        try:
            data: bytes = msgpack.packb(obj, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise LocalProtocolError(f"message cannot be encoded: {e}") from e
        if len(data) > self.limits.max_message_size:
            raise LocalProtocolError(
                f"message of {len(data)} bytes exceeds {self.limits.max_message_size}"
            )
        return data

    def _params(self, value: object, msgid: int | None) -> list[Any]:
        if not isinstance(value, list):
            raise BadTypeError(f"params is a {type(value).__name__}, not an array", msgid=msgid)
        return value


class ServerConnection(_Connection):
    """The node's side of one local RPC connection: requests in, responses out.

    It tracks which msgids are awaiting a response, so that a duplicate msgid (which would make
    the answers ambiguous) and requests beyond ``limits.max_in_flight`` are refused.
    """

    def __init__(self, limits: RpcLimits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._in_flight: set[int] = set()

    @property
    def in_flight(self) -> frozenset[int]:
        return frozenset(self._in_flight)

    def next_event(self) -> Request | Notification | None:
        ok, obj = self._next_object()
        if not ok:
            return None
        if not isinstance(obj, list) or not obj:
            raise BadShapeError(f"message is a {type(obj).__name__}, not a non-empty array")
        kind = obj[0]
        if kind == REQUEST and type(kind) is int:
            return self._request(obj)
        if kind == NOTIFICATION and type(kind) is int:
            if len(obj) != 3:
                raise BadShapeError(f"notification has {len(obj)} elements, not 3")
            _, method, params = obj
            name = _method_name(method)
            if name is None or not isinstance(params, list):
                raise UnusableNotificationError(
                    f"notification with a {type(method).__name__} method and "
                    f"{type(params).__name__} params"
                )
            return Notification(name, params)
        raise UnknownKindError(f"message kind {kind!r} is not a request or a notification")

    def _request(self, obj: list[Any]) -> Request:
        msgid = obj[1] if len(obj) > 1 and _is_msgid(obj[1]) else None
        if len(obj) != 4:
            raise BadShapeError(f"request has {len(obj)} elements, not 4", msgid=msgid)
        _, raw_msgid, method, params = obj
        if msgid is None:
            raise BadMsgidError(f"msgid {raw_msgid!r} is not a uint32")
        if msgid in self._in_flight:
            # Answering it would be read as the answer to the first request with this msgid.
            raise BadMsgidError(f"msgid {msgid} is already in flight")
        name = _method_name(method)
        if name is None:
            raise BadTypeError("request method is not UTF-8 text", msgid=msgid)
        params = self._params(params, msgid)
        if len(self._in_flight) >= self.limits.max_in_flight:
            raise BusyError(
                f"{len(self._in_flight)} requests already in flight on this connection "
                f"(limit {self.limits.max_in_flight})",
                msgid=msgid,
            )
        self._in_flight.add(msgid)
        return Request(msgid, name, params)

    def send_response(self, msgid: int, error: object, result: object) -> bytes:
        """Answer a request returned by :meth:`next_event`; ``error`` is None on success."""
        if msgid not in self._in_flight:
            raise LocalProtocolError(f"msgid {msgid} is not awaiting a response")
        data = self._pack([RESPONSE, msgid, error, None if error is not None else result])
        self._in_flight.discard(msgid)
        return data

    def send_rejection(self, error: RejectedMessageError) -> bytes:
        """Answer a request that :meth:`next_event` refused (it was never in flight)."""
        if error.msgid is None:
            raise LocalProtocolError("a rejection without a msgid cannot be answered")
        return self._pack([RESPONSE, error.msgid, error_object(error.code, str(error)), None])

    def send_notification(self, method: str, params: Sequence[Any]) -> bytes:
        return self._pack([NOTIFICATION, method, list(params)])

    def send_stream_notification(self, msgid: int, method: str, params: Sequence[Any]) -> bytes:
        """A notification that belongs to request ``msgid`` (see the module docstring)."""
        if msgid not in self._in_flight:
            raise LocalProtocolError(f"msgid {msgid} is not in flight")
        return self._pack([NOTIFICATION, method, [msgid, *params]])


class ClientConnection(_Connection):
    """A script's side of one local RPC connection: requests out, responses in."""

    def __init__(self, limits: RpcLimits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._next_msgid = 0
        self._waiting: set[int] = set()
        # Calls given up on (timeout, cancel): their late response is dropped, not an error.
        self._abandoned: set[int] = set()

    def send_request(self, method: str, params: Sequence[Any]) -> tuple[int, bytes]:
        if len(self._waiting) + len(self._abandoned) > MAX_MSGID:
            raise LocalProtocolError("every msgid is in use")
        msgid = self._next_msgid
        while msgid in self._waiting or msgid in self._abandoned:
            msgid = (msgid + 1) & MAX_MSGID
        self._next_msgid = (msgid + 1) & MAX_MSGID
        data = self._pack([REQUEST, msgid, method, list(params)])
        self._waiting.add(msgid)
        return msgid, data

    def send_notification(self, method: str, params: Sequence[Any]) -> bytes:
        return self._pack([NOTIFICATION, method, list(params)])

    def forget(self, msgid: int) -> None:
        """Drop a request that was never sent after all."""
        self._waiting.discard(msgid)

    def abandon(self, msgid: int) -> bytes:
        """Give up on a call; returns the ``rpc.cancel`` notification to send to the server."""
        if msgid in self._waiting:
            self._waiting.discard(msgid)
            self._abandoned.add(msgid)
        return self.send_notification(CANCEL_METHOD, [msgid])

    def _known(self, msgid: int) -> bool:
        return msgid in self._waiting or msgid in self._abandoned

    def next_event(self) -> Response | Notification | None:
        while True:
            ok, obj = self._next_object()
            if not ok:
                return None
            event = self._parse(obj)
            if isinstance(event, Response) and event.msgid in self._abandoned:
                self._abandoned.discard(event.msgid)
                continue
            if isinstance(event, Notification) and event.msgid in self._abandoned:
                continue
            return event

    def _parse(self, obj: object) -> Response | Notification:
        if not isinstance(obj, list) or not obj:
            raise BadShapeError(f"message is a {type(obj).__name__}, not a non-empty array")
        kind = obj[0]
        if kind == RESPONSE and type(kind) is int:
            if len(obj) != 4:
                raise BadShapeError(f"response has {len(obj)} elements, not 4")
            _, msgid, error, result = obj
            if not _is_msgid(msgid):
                raise BadMsgidError(f"msgid {msgid!r} is not a uint32")
            if not self._known(msgid):
                raise BadMsgidError(f"response to msgid {msgid}, which we never sent or got back")
            self._waiting.discard(msgid)
            return Response(msgid, error, result)
        if kind == NOTIFICATION and type(kind) is int:
            if len(obj) != 3:
                raise BadShapeError(f"notification has {len(obj)} elements, not 3")
            _, method, params = obj
            if not isinstance(method, str):
                raise BadTypeError("notification method is not a str")
            params = self._params(params, None)
            if params and _is_msgid(params[0]) and self._known(params[0]):
                return Notification(method, params[1:], params[0])
            return Notification(method, params)
        raise UnknownKindError(f"message kind {kind!r} is not a response or a notification")
