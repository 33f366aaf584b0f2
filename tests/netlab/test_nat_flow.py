"""Real ``vmlend`` nodes across the lab: a scheduler in public, an owner behind NAT A, a worker
behind NAT B (issue 17): the whole flow, from submit to the owner's results, with no traversal
beyond the connections the home nodes open themselves.

What carries it (5 ms each way on both uplinks, both NATs port-preserving MASQUERADE):
- both home nodes connect out to the scheduler and find its record (its addresses are public);
- each home node advertises only its private 198.19.x address, so nobody can dial it back: the
  scheduler's connection to the worker's data channel fails, and the result's chunks come on
  libp2p streams over the connection the worker opened (``fetching on libp2p`` in its log);
- DHT operations of the home nodes (the scheduler index, provider lookups, provides) run into
  their 10 s deadlines, because the DHT keeps handing them the other home's unreachable peer:
  a fetch from the scheduler named in a lease no longer waits for them, but the owner's first
  submit still waits out the scheduler listing's 10 s (what NAT traversal is left to fix).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.netlab.lab import Lab
from tests.netlab.topology import LinkSpec, two_homes

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

TASK = """\
name = "acrossnat"
os = "tiny"
command = "echo across-nat; exit 3"
[resources]
memory = "128MiB"
[limits]
max_runtime = "2m"
"""


async def test_scheduler_public_owner_and_worker_behind_two_nats(
    lab_prefix: str, tmp_path: Path
) -> None:
    topology = two_homes(LinkSpec(delay_ms=5))
    async with Lab(topology, lab_prefix, tmp_path / "lab") as lab, trio.open_nursery() as nursery:
        sched = lab.node("sched", tmp_path / "sched", ("scheduler",))
        await sched.start(nursery)
        assert sched.addrs[0].startswith(f"/ip4/{lab.host('sched').ip}/tcp/")
        boot = (sched.addrs[0],)
        owner = lab.node("own", tmp_path / "own", ("owner",), boot)
        worker = lab.node("wrk", tmp_path / "wrk", ("worker",), boot)
        await owner.start(nursery)
        await worker.start(nursery)

        # Both homes connect out through their NATs; the scheduler sees both peers...
        with trio.fail_after(60):
            peers = await sched.call("peers.wait", {"count": 2, "timeout": 60})
        assert {p["peer_id"] for p in peers} == {owner.peer_id, worker.peer_id}
        # ...under the private addresses they advertise (unreachable from the public side).
        for p in peers:
            assert all("/ip4/198.19." in a for a in p["addrs"]), p

        # Both find the scheduler (its record carries its public address).
        for node in (owner, worker):
            with trio.fail_after(90):
                found = await node.call("schedulers.wait", {"count": 1, "timeout": 80})
            assert [s["peer_id"] for s in found] == [sched.peer_id]

        # The owner's task is accepted; the worker behind the other NAT gets its lease, fetches
        # the image from the public scheduler and runs the VM; the scheduler takes the result
        # from the worker over the connection the worker opened (its data channel is behind
        # the NAT), and the owner gets it from the scheduler.
        where = tmp_path / "task"
        where.mkdir()
        (where / "task.toml").write_text(TASK)
        with trio.fail_after(120):
            answer = await owner.call("task.submit", {"text": TASK, "base_dir": str(where)})
        assert answer["scheduler"] == sched.peer_id
        task_id = answer["task_id"]
        with trio.fail_after(300):
            done = await owner.call("task.wait", {"task_id": task_id, "timeout": 290})
            results = await owner.call("task.results", {"task_id": task_id})
        assert done["state"] == "succeeded", done
        assert done["reported_by"] == [worker.peer_id], done
        assert (results["exit_code"], results["stdout"]) == (3, b"across-nat\n"), results
        assert any("fetching on libp2p" in line for line in sched.output), sched.output[-20:]

        for node in (owner, worker, sched):
            assert await node.stop() == 0, node.output[-10:]
        nursery.cancel_scope.cancel()
