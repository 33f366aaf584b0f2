"""Fixtures of the network lab: every lab a test builds is torn down, whatever happened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netlab.lab import down, sweep_orphans, test_prefix


@pytest.fixture
def lab_prefix() -> Iterator[str]:
    """A namespace prefix only this test uses; everything under it is removed at teardown even
    if the test (or the lab's own teardown) failed. Labs left by dead runs are swept first."""
    sweep_orphans()
    prefix = test_prefix()
    try:
        yield prefix
    finally:
        down(prefix)


@pytest.fixture(scope="module")
def module_lab_prefix() -> Iterator[str]:
    sweep_orphans()
    prefix = test_prefix()
    try:
        yield prefix
    finally:
        down(prefix)


@pytest.fixture(scope="module")
def module_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("netlab")
