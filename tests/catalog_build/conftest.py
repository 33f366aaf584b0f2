"""Fixtures for image-building tests.

Builds of debian-12 go to one cache per machine (``$VMLEND_BUILD_CACHE`` or
/var/cache/vmlend/build), so the suite builds it at most once per archive state (~2 min); tests of
assembly logic use the tiny OS and private caches, and cost about a second each.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.build import BootFiles, BuildCache, default_cache_dir
from worker_role import tinyos
from worker_role.errors import TinyOsError

# Files handed to VMs must be readable by QEMU's user: not under pytest's 0700 tmp dirs.
VM_FILES = Path("/var/lib/vmlend/test-images")


@pytest.fixture(scope="session")
def boot() -> BootFiles:
    """The tiny OS's kernel + init (built by ``make tinyos``; built here if it is missing)."""
    try:
        return tinyos.locate()
    except TinyOsError:
        return tinyos.build()


@pytest.fixture(scope="session")
def shared_cache() -> BuildCache:
    return BuildCache(default_cache_dir())


@pytest.fixture
def vm_files() -> Iterator[Path]:
    VM_FILES.mkdir(parents=True, exist_ok=True)
    VM_FILES.chmod(0o755)
    path = VM_FILES / uuid.uuid4().hex
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_task(directory: Path, text: str, files: dict[str, str] | None = None) -> Path:
    """A task dir with ``task.toml`` and ``files`` (relative path -> content)."""
    directory.mkdir(parents=True, exist_ok=True)
    for rel, content in (files or {}).items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (directory / "task.toml").write_text(text)
    return directory / "task.toml"
