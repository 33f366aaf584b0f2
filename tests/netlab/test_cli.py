"""``scripts/netlab`` as a person runs it: up, exec, list, down, and their mistakes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.netlab.lab import namespaces

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "netlab"


def netlab(prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMLEND_NETLAB_PREFIX=prefix)
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_up_exec_down_by_hand(lab_prefix: str) -> None:
    up = netlab(lab_prefix, "up", "public", "--count", "2", "--delay-ms", "5")
    assert up.returncode == 0, up.stderr
    assert "198.18.0.10" in up.stdout
    assert "198.18.0.11" in up.stdout
    assert len(namespaces(lab_prefix)) == 3  # the switch and two hosts
    # The forwarder outlived `up`: a connect from n0 to n1 crosses two shaped links.
    probe = "import socket; s = socket.socket(); print(s.connect_ex(('198.18.0.11', 9)))"
    run = netlab(lab_prefix, "exec", "n0", "python3", "-c", probe)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "111"  # ECONNREFUSED: n1 answered
    assert lab_prefix + "n1" in netlab(lab_prefix, "list").stdout
    again = netlab(lab_prefix, "up", "public")
    assert again.returncode == 1
    assert again.stderr.strip() == "a lab is already up; run 'scripts/netlab down' first"
    down = netlab(lab_prefix, "down")
    assert down.returncode == 0
    assert down.stdout.strip() == "removed 3 namespaces"
    assert namespaces(lab_prefix) == []


def test_mistakes_get_one_line(lab_prefix: str) -> None:
    missing = netlab(lab_prefix, "exec", "nobody", "true")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "no host or router 'nobody' in the lab (scripts/netlab list)"
    bad = netlab("elsewhere-", "down")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "netlab: VMLEND_NETLAB_PREFIX must start with vlab-"
    loss = netlab(lab_prefix, "up", "two-homes", "--loss", "2")
    assert loss.returncode == 1
    assert loss.stderr.strip() == "netlab: home a's uplink: loss must be within 0..1"
    assert namespaces(lab_prefix) == []
