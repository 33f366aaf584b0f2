"""Ordinary mistakes around ``vmlend node start``, through the real binary (issue 18, items 2-4):
one line naming what was wrong and what to do next, never a traceback, and nothing left half
running."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.localnet import local_network, vmlend_command

pytestmark = pytest.mark.e2e


async def vmlend(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [*vmlend_command(), *args], capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


async def test_a_second_node_on_the_same_data_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    async with local_network(tmp_path, 1, roles=[("owner",)]) as (first,):
        code, _, err = await vmlend("node", "start", "--data", str(first.data_dir))
        line = one_line(err)
        assert code == 1
        assert f"already running with data dir {first.data_dir}" in line
        assert "another --data" in line
        # The first node never noticed.
        assert (await first.call("node.info"))["peer_id"] == first.peer_id


async def test_a_data_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = await vmlend("node", "start", "--data", str(blocker / "sub"))
    line = one_line(err)
    assert code == 1
    assert f"cannot create data directory {blocker / 'sub'}" in line
    assert "--data" in line


async def test_a_port_another_node_listens_on_is_refused(tmp_path: Path) -> None:
    """py-libp2p listens with SO_REUSEPORT: a second node on the same port started fine and the
    kernel split incoming connections between the two."""
    async with local_network(tmp_path, 1, roles=[("owner",)]) as (first,):
        port = first.addrs[0].split("/tcp/")[1].split("/")[0]
        listen = f"/ip4/127.0.0.1/tcp/{port}"
        other = tmp_path / "other"
        code, out, err = await vmlend(
            "node", "start", "--data", str(other), "--roles", "owner", "--listen", listen
        )
        line = one_line(err)
        assert code == 1
        assert f"port {port} on 127.0.0.1 is already in use" in line
        assert "--listen" in line
        assert "listening on" not in out
        assert not (other / "rpc.sock").exists()


async def test_no_node_running_names_the_data_dir_given_and_how_to_start_one(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "srv" / "a"
    code, _, err = await vmlend("status", "--data", str(missing))
    line = one_line(err)
    assert code == 1
    assert f"no vmlend node is running with data dir {missing} " in line
    assert f"no socket at {missing / 'rpc.sock'}" in line
    assert f"vmlend node start --data {missing}" in line
