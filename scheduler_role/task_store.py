"""The tasks a scheduler accepted, on its disk: one directory per task, named by its checked ID.

``<data>/tasks/<task_id>/task.msgpack`` holds the parsed task (:mod:`catalog.task_wire`), and
``files/`` the files and local package directories the owner shipped, unpacked from the owner's
archive: a plain tar (never decompressed), within member and byte limits, only the paths the task
names, nothing that points outside. A task directory is written under a staging name, synced,
then renamed into place, so a task acknowledged to its owner survives a crash whole.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import msgpack

from catalog.errors import CatalogError
from catalog.task_wire import task_from_wire, task_to_wire
from catalog.taskfile import TaskFile
from node.durable import sync_directory
from node.errors import LocalProtocolError
from scheduler_role.errors import SchedulerError

MAX_ARCHIVE_MEMBERS = 4096
MAX_ARCHIVE_BYTES = 256 << 20
TASK_RECORD = "task.msgpack"
FILES_DIR = "files"


class TaskFilesError(SchedulerError):
    """The files an owner shipped with a task cannot be accepted; the message says why."""


def load_task(task_dir: Path) -> TaskFile:
    """The task stored in ``task_dir`` by a submit, its files beside it."""
    try:
        raw = msgpack.unpackb((task_dir / TASK_RECORD).read_bytes(), raw=False)
        return task_from_wire(raw, base_dir=task_dir / FILES_DIR)
    except (LocalProtocolError, ValueError, msgpack.UnpackException) as e:
        raise CatalogError(f"stored task in {task_dir} is invalid: {e}") from e


def unpack_files(archive: Path, into: Path, members: list[str]) -> None:
    """Unpack the owner's archive into ``into``: a plain tar (never decompressed), within the
    member and byte limits, only the paths the task names (and what lies below them)."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            entries = []
            total = 0
            for entry in tar:
                entries.append(entry)
                total += entry.size
                if len(entries) > MAX_ARCHIVE_MEMBERS or total > MAX_ARCHIVE_BYTES:
                    raise TaskFilesError(
                        f"the task's files exceed {MAX_ARCHIVE_MEMBERS} entries or "
                        f"{MAX_ARCHIVE_BYTES >> 20} MiB"
                    )
                if not any(entry.name == m or entry.name.startswith(m + "/") for m in members):
                    raise TaskFilesError(f"the archive holds {entry.name[:200]!r}")
            into.mkdir(parents=True, exist_ok=True)
            tar.extractall(into, members=entries, filter="data")  # no links out, no devices
    except (tarfile.TarError, OSError) as e:
        raise TaskFilesError(f"the task's files: {e}") from None
    finally:
        archive.unlink(missing_ok=True)
    missing = [m for m in members if not (into / m).exists()]
    if missing:
        raise TaskFilesError(f"the archive lacks {', '.join(missing)[:500]}")


def store_task(where: Path, task: TaskFile) -> None:
    """Write the parsed task durably (file and directory synced) before it is acknowledged."""
    where.mkdir(parents=True, exist_ok=True)
    data = msgpack.packb(task_to_wire(task), use_bin_type=True)
    path = where / TASK_RECORD
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_tree(where)


def settle(staging: Path, where: Path) -> None:
    """Move a fully written task directory into place (atomically), replacing a leftover."""
    discard(where)
    staging.rename(where)
    sync_directory(where.parent)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(directory) / name, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_directory(Path(directory))


def discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.with_suffix(".tar").unlink(missing_ok=True)
