"""Peers cannot flood a node's log: long lines are cut, repeated warnings held back."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from node.log_hygiene import LogHygiene


def record(
    msg: str, *args: object, level: int = logging.WARNING, name: str = "libp2p.x"
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


def test_a_huge_peer_value_is_cut_to_a_size_and_a_hash() -> None:
    hygiene = LogHygiene(max_chars=100)
    r = record("invalid record %s", "ab" * 1_000_000, level=logging.INFO)
    assert hygiene.filter(r)
    line = r.getMessage()
    assert len(line) < 200
    assert "2000015 chars, sha256 " in line


def test_the_same_warning_is_said_once_per_interval_with_a_count() -> None:
    now = [0.0]
    hygiene = LogHygiene(interval=60.0, clock=lambda: now[0])
    said = [hygiene.filter(record("peer %s does not speak %s", f"p{n}", "hb")) for n in range(50)]
    assert said == [True] + [False] * 49
    now[0] = 61.0
    again = record("peer %s does not speak %s", "p99", "hb")
    assert hygiene.filter(again)
    assert "(and 49 more like it" in again.getMessage()
    assert hygiene.filter(record("another warning"))  # other templates are not held back


def test_info_lines_are_never_held_back() -> None:
    hygiene = LogHygiene(interval=60.0, clock=lambda: 0.0)
    assert all(hygiene.filter(record("x %s", n, level=logging.INFO)) for n in range(10))


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter at the repository root (logging set up from scratch)."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )


def test_the_command_lines_logging_is_hygienic() -> None:
    code = (
        "import logging; from node.cli_common import configure_logging; configure_logging(0)\n"
        "for _ in range(5): logging.getLogger('vmlend.x').error('peer sent %s', 'ab' * 100000)\n"
    )
    out = run_python(code)
    lines = out.stderr.splitlines()
    assert len(lines) == 1  # the same error, said once
    assert len(lines[0]) < 600
    assert "200010 chars, sha256 " in lines[0]


@pytest.mark.parametrize(("verbosity", "shown"), [(0, False), (1, False), (2, True)])
def test_py_libp2ps_own_errors_are_shown_only_at_debug(verbosity: int, shown: bool) -> None:
    """py-libp2p logs a multi-line ERROR for every stream a peer refuses (a worker that does not
    serve a scheduler's protocol) and a WARNING for every DHT stream a peer closes early; the p2p
    adapter turns each into an error of its own, reported where it matters."""
    code = (
        "import logging; from node.cli_common import configure_logging\n"
        f"configure_logging({verbosity})\n"
        "logging.getLogger('libp2p.host.basic_host').error('Failed to open stream\\n  Error: x')\n"
        "logging.getLogger('libp2p.kad_dht').warning('Failed to read DHT message from stream')\n"
    )
    out = run_python(code)
    assert ("Failed to open stream" in out.stderr) is shown
    assert ("Failed to read DHT message" in out.stderr) is shown


@pytest.mark.parametrize(("verbosity", "shown"), [(0, False), (2, True)])
def test_py_libp2ps_lines_stay_ours_after_it_is_imported(verbosity: int, shown: bool) -> None:
    """Importing py-libp2p detaches its loggers, and its warnings went raw to stderr through
    Python's last-resort handler, once a second for a bootstrap peer that was down."""
    code = (
        "import logging; from node.cli_common import configure_logging\n"
        f"configure_logging({verbosity})\n"
        "import node.p2p\n"
        "logging.getLogger('libp2p.transport.tcp').error('Failed to open TCP stream: refused')\n"
    )
    out = run_python(code)
    if shown:
        assert re.search(
            r"(?m)^\S+Z libp2p.transport.tcp ERROR Failed to open TCP stream: refused$", out.stderr
        ), out.stderr
    else:
        assert out.stderr == ""
