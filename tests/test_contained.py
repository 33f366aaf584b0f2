"""Paths built from strangers' names stay inside the directory meant for them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.contained import UncontainedPathError, contained


@pytest.mark.parametrize(
    "name",
    ["..", ".", "", "../../root/.ssh", "/etc/passwd", "a/b", "a\0b", "-rf", ".hidden", "a" * 129],
)
def test_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(UncontainedPathError):
        contained(Path("/srv/tasks"), name)


def test_plain_names_join() -> None:
    assert contained(Path("/srv/tasks"), "run-1a2b", "x.y") == Path("/srv/tasks/run-1a2b/x.y")


@given(st.text(max_size=40))
def test_whatever_the_name_the_path_stays_inside(name: str) -> None:
    root = Path("/srv/tasks")
    try:
        path = contained(root, name)
    except UncontainedPathError:
        return
    assert path.parent == root
    assert path.name == name
