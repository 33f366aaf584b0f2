"""The tiny OS recipe is reproducible: a fresh build from the same inputs gives the same bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from worker_role.tinyos import build, locate

pytestmark = pytest.mark.vm  # needs apt and the network to Debian's mirror (or its cache)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_build_is_byte_identical_to_the_cached_one(tmp_path: Path) -> None:
    cached = build()  # the one the VM tests use (idempotent: reused when already built)
    assert locate() == cached
    fresh = build(data=tmp_path)
    assert fresh.ident == cached.ident
    assert _sha(fresh.kernel) == _sha(cached.kernel)
    assert _sha(fresh.initrd) == _sha(cached.initrd)
    # And building again over an existing build changes nothing and downloads nothing.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "tinyos").rglob("*") if p.is_file()}
    again = build(data=tmp_path)
    assert again == fresh
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "tinyos").rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "current.json"} == {
        p: t for p, t in before.items() if p.name != "current.json"
    }
