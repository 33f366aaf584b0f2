"""State files: whole or not at all, never a followed link, never fatal when torn."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from node import durable
from node.durable import read_state, write_atomically


def test_a_state_file_is_replaced_whole_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_a_planted_link_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    # Even an attacker who guessed the random name exactly only makes the write fail.
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / ".state.json.guessed.tmp").symlink_to(target)
    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "state.json", b"data")
    assert target.read_text() == "untouched"
    assert not (tmp_path / "state.json").exists()


def test_a_torn_state_file_is_set_aside_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"a": [1, 2')  # a crash mid-write of a non-atomic writer
    with caplog.at_level(logging.WARNING):
        assert read_state(path, json.loads) is None
    assert not path.exists()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["state.json.corrupt"]
    assert "moved aside" in caplog.text
    assert read_state(path, json.loads) is None  # and then simply absent


def test_a_good_state_file_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b'{"a": 1}')
    assert read_state(path, json.loads) == {"a": 1}
