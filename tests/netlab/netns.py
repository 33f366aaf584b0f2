"""Enter a network namespace from this process: sockets and TAP file descriptors made in one.

``setns(2)`` moves only the calling thread, and a socket or TAP keeps the namespace it was made
in, so a test can open a socket "inside" a lab node, switch back at once and use the socket from
trio as any other. Every switch here is synchronous and restored before the next ``await``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from node.errors import VmlendError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(VmlendError):
    """A network namespace could not be entered or used."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with this thread in the namespace ``name`` (``ip netns`` names it)."""
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"no network namespace named {name!r}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def socket_in(name: str, kind: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
    """A trio IPv4 socket of ``kind`` that lives in the namespace ``name``."""
    with inside(name):
        raw = socket.socket(socket.AF_INET, kind)
    return trio.socket.from_stdlib_socket(raw)


def open_tap(name: str, device: str) -> int:
    """A non-blocking fd on the persistent TAP ``device`` of namespace ``name``: frames the
    kernel sends out of the device are read here, frames written here arrive on it."""
    with inside(name):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise NetnsError(f"cannot attach to TAP {device} in {name}: {exc.strerror}") from None
    return fd
