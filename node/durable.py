"""Small state files that survive crashes and strangers: written whole or not at all, read back
without ever stopping the node.

:func:`write_atomically` writes a new file under a random name that nobody can have prepared
(``O_EXCL | O_NOFOLLOW``, so a planted link is never followed), syncs it, renames it over the old
one and syncs the directory: after a crash the file holds the old or the new bytes, never a mix.
:func:`read_state` reads one back; a file that does not parse is moved aside as
``<name>.corrupt-<time>`` with a warning and the caller starts from nothing, since a torn or
damaged state file must not keep a node from starting.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("vmlend.node.durable")

T = TypeVar("T")


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(path: Path, parse: Callable[[bytes], T]) -> T | None:
    """``parse(bytes)`` of the file, ``None`` when there is none; a file that ``parse`` refuses
    (with ValueError, TypeError or KeyError) is set aside, not fatal."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return parse(data)
    except (ValueError, TypeError, KeyError) as e:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        log.warning("%s could not be read (%s); moved aside to %s, starting without it",
                    path, str(e)[:200], aside)  # fmt: skip
        return None
