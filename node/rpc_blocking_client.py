"""The local node's RPC client without trio: :class:`Client`, blocking, for scripts and the CLI.

It also holds what :mod:`node.rpc_client`'s trio client shares with it (the socket's path, the
errors a connect or a call ends in, the :class:`Result` of a streaming call). Kept apart from
that module so that a command such as ``vmlend peers`` connects without importing trio, which
alone takes longer to import than the whole command should take.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from node import rpc
from node.errors import (
    DeadlineError,
    PeerUnreachableError,
    RemoteProtocolError,
    RpcError,
    StreamBrokenError,
)

SOCKET_NAME = "rpc.sock"
RECEIVE_SIZE = 64 * 1024


class NodeNotRunningError(PeerUnreachableError):
    """No node is listening on the socket."""


@dataclass(frozen=True, slots=True)
class Result:
    """The last item of a streaming call (:meth:`Client.stream`, ``AsyncClient.stream``)."""

    value: Any


def socket_path(target: str | os.PathLike[str]) -> Path:
    """``target`` itself when it is a socket (or named ``*.sock``), else the socket in the data
    directory ``target``, ``<target>/rpc.sock``, whether that directory exists or not."""
    path = Path(target)
    if path.suffix == ".sock" or path.is_socket():
        return path
    return path / SOCKET_NAME


def _not_running(path: Path, why: str) -> NodeNotRunningError:
    data = path.parent
    return NodeNotRunningError(
        f"no vmlend node is running with data dir {data} ({why}); "
        f"start one with 'vmlend node start --data {data}'"
    )


def connect_error(path: Path, e: OSError) -> Exception:
    """What a failed connect to the node's socket at ``path`` means for the caller."""
    if isinstance(e, FileNotFoundError):
        return _not_running(path, f"no socket at {path}")
    if isinstance(e, ConnectionRefusedError):
        return _not_running(path, f"stale socket at {path}: nothing answers")
    if isinstance(e, PermissionError):
        return PeerUnreachableError(f"not allowed to use the node's socket {path}: {e}")
    return PeerUnreachableError(f"cannot connect to {path}: {e}")


def response_value(response: rpc.Response) -> Any:
    """The call's result, or its error raised as :class:`RpcError`."""
    if response.error is None:
        return response.result
    raise _rpc_error(response.error)


def _rpc_error(error: object) -> RpcError:
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return RpcError(error["code"], str(error.get("message", "")))
    return RpcError("error", repr(error))  # a server that is not ours


def closing_error(event: rpc.Response | rpc.Notification) -> RpcError | None:
    """The node's reason when ``event`` says it is closing the connection, else None."""
    if not isinstance(event, rpc.Notification) or event.msgid is not None or not event.params:
        return None
    if event.method == rpc.CLOSING_METHOD:
        return _rpc_error(event.params[0])
    return None


class _Default(enum.Enum):
    TIMEOUT = enum.auto()


class Client:
    """A blocking client for scripts: ``Client(data_dir).call("node.info")``. No trio needed.

    One call at a time; the connection opens on first use and reopens after it breaks.
    ``timeout`` bounds a whole :meth:`call`, and each wait for the next item of a :meth:`stream`.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        timeout: float | None = 30.0,
        limits: rpc.RpcLimits = rpc.DEFAULT_LIMITS,
    ) -> None:
        self.path = socket_path(target)
        self.timeout = timeout
        self._limits = limits
        self._sock: socket.socket | None = None
        self._proto = rpc.ClientConnection(limits)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(
        self, method: str, *params: Any, timeout: float | _Default | None = _Default.TIMEOUT
    ) -> Any:
        """Call ``method``; ``timeout`` (seconds, None for none) defaults to the client's."""
        limit = self.timeout if isinstance(timeout, _Default) else timeout
        deadline = None if limit is None else time.monotonic() + limit
        for item in self._run(method, params, lambda: deadline):
            if isinstance(item, Result):
                return item.value
        raise AssertionError("unreachable: a call always ends with its result or an error")

    def stream(self, method: str, *params: Any) -> Iterator[rpc.Notification | Result]:
        timeout = self.timeout
        return self._run(
            method, params, lambda: None if timeout is None else time.monotonic() + timeout
        )

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(self.path))
            except OSError as e:
                sock.close()
                raise connect_error(self.path, e) from None
            self._sock = sock
            self._proto = rpc.ClientConnection(self._limits)
        return self._sock

    def _run(
        self, method: str, params: Sequence[Any], deadline: Callable[[], float | None]
    ) -> Iterator[rpc.Notification | Result]:
        sock = self._connect()
        msgid, data = self._proto.send_request(method, params)
        done = False
        try:
            self._sendall(sock, data)
            while True:
                event = self._next_event(sock, deadline(), method)
                if isinstance(event, rpc.Response) and event.msgid == msgid:
                    done = True
                    yield Result(response_value(event))
                    return
                if isinstance(event, rpc.Notification) and event.msgid == msgid:
                    yield event
        finally:
            if not done and self._sock is not None:
                # Timed out, or the caller stopped iterating: stop the work on the node too.
                with contextlib.suppress(OSError):
                    sock.settimeout(1)
                    sock.sendall(self._proto.abandon(msgid))

    def _sendall(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
        except OSError as e:
            self.close()
            raise StreamBrokenError(f"connection to {self.path} broke: {e}") from e

    def _next_event(
        self, sock: socket.socket, deadline: float | None, method: str
    ) -> rpc.Response | rpc.Notification:
        while True:
            try:
                event = self._proto.next_event()
            except RemoteProtocolError as e:
                self.close()
                raise StreamBrokenError(f"the node broke the protocol: {e}") from e
            if event is not None:
                if (closing := closing_error(event)) is not None:
                    self.close()
                    raise closing
                return event
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineError(f"{method}: no answer within the timeout")
            try:
                sock.settimeout(remaining)
                data = sock.recv(RECEIVE_SIZE)
            except TimeoutError:
                raise DeadlineError(f"{method}: no answer within the timeout") from None
            except OSError as e:
                self.close()
                raise StreamBrokenError(f"connection to {self.path} broke: {e}") from e
            if not data:
                self.close()
                raise StreamBrokenError(f"the node closed the connection {self.path}")
            self._proto.receive_data(data)
