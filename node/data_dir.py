"""Where a node keeps its files: the data directory every command and the daemon agree on.

Apart from :mod:`node.config` (which re-exports it) because a command that only talks to the
running node needs the directory, not the parsing of its configuration files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from node.errors import VmlendError

LOCK_NAME = "node.lock"


class DataDirError(VmlendError):
    """The data directory cannot be created, or another node already runs on it."""


def resolve_data_dir(flag: str | None, *, env: Mapping[str, str] | None = None) -> Path:
    """``--data`` > ``$VMLEND_DATA`` > ``$XDG_DATA_HOME/vmlend`` > ``~/.local/share/vmlend``.

    Empty variables count as unset, and a relative ``$XDG_DATA_HOME`` is ignored, as the XDG base
    directory spec says. The result is absolute, so a later ``chdir`` cannot move it.
    """
    env = os.environ if env is None else env
    for candidate in (flag, env.get("VMLEND_DATA")):
        if candidate:
            return Path(candidate).expanduser().absolute()
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "vmlend"
    return Path("~/.local/share/vmlend").expanduser().absolute()


def create_data_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) with its parents; DataDirError saying what to do if not."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise DataDirError(
            f"cannot create data directory {path}: {e.strerror}; "
            "choose a directory you can write with --data DIR"
        ) from None
    if not path.is_dir():
        raise DataDirError(f"data directory {path} is not a directory; choose another with --data")


@contextlib.contextmanager
def data_dir_lock(path: Path) -> Iterator[None]:
    """Hold ``<path>/node.lock`` for as long as a node runs on ``path``: a second node on the same
    data directory would share its key, its stores and its socket. The lock is the kernel's
    (``flock``), so a node killed with -9 leaves nothing to clean up; the file says the pid."""
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DataDirError(f"cannot open {lock}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirError(
                f"a vmlend node is already running with data dir {path} (pid {holder}); "
                "stop it first, or start this one with another --data"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
