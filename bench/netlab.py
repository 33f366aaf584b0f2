"""DHT lookups and scheduler discovery across the network lab (40 ms round trip between any two
hosts) versus plain loopback, in the same run. Prints JSON. Needs root (network namespaces).

- DHT: one measuring P2PNode in this process and ``--nodes - 1`` peer processes
  (tests/p2p_helpers/peer_proc, 3 of them publish a record); ``get_record`` (asks the owner of
  the record first) and the DHT path alone (iterative lookup + GET_VALUE), as bench/p2p.py does.
- Scheduler discovery: a real ``vmlend node start`` scheduler, then fresh owner nodes one after
  another, each bootstrapping from it: time to ready, then time until ``schedulers.wait`` finds it.
- The lab: every host on the public segment behind an access link with ``--delay-ms`` each way
  (default 10: a round trip crosses four link traversals, 40 ms), measured with a UDP echo.

    sudo .venv/bin/python bench/netlab.py [--nodes 10] [--lookups 10] [--owners 3] [--delay-ms 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.dht_records import RecordNotFoundError, record_key
from node.errors import DeadlineError
from node.identity import Identity
from node.localnet import LocalNode
from node.p2p import P2PNode
from tests.netlab import probe
from tests.netlab.lab import Lab, sweep_orphans, test_prefix
from tests.netlab.netns import inside
from tests.netlab.topology import LinkSpec, public_only

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"heartbeat_interval": 2.0, "peer_timeout": 10.0, "discovery_interval": 5.0}


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def summary(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[max(int(len(ordered) * 0.9) - 1, 0)] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
        "n": len(ordered),
    }


class Place:
    """Where the processes of one phase run: loopback, or the hosts of a lab."""

    def __init__(self, lab: Lab | None) -> None:
        self.lab = lab
        self._next = 1  # host n0 is this process's own

    def take(self) -> tuple[str, list[str], str]:
        """A listen IP, the command prefix that runs a process there, and the lab host's name."""
        if self.lab is None:
            return "127.0.0.1", [], ""
        host = self.lab.host(f"n{self._next}")
        self._next += 1
        return host.ip, ["ip", "netns", "exec", host.netns], host.name

    def here(self) -> tuple[str, Callable[[], AbstractContextManager[None]]]:
        if self.lab is None:
            return "127.0.0.1", nullcontext
        me = self.lab.host("n0")
        return me.ip, lambda: inside(me.netns)


@asynccontextmanager
async def peer(place: Place, bootstrap: str, publish: bool) -> AsyncIterator[dict[str, Any]]:
    ip, prefix, _ = place.take()
    env = dict(os.environ, PYTHONPATH=str(ROOT), VMLEND_TEST_TIMINGS=json.dumps(TIMINGS))
    env["VMLEND_TEST_LISTEN"] = f"/ip4/{ip}/tcp/0"
    args = ["--publish", "bench"] if publish else []
    cmd = [*prefix, sys.executable, "-m", "tests.p2p_helpers.peer_proc", *args, bootstrap]
    process = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, cwd=ROOT, env=env)
    assert process.stdout is not None
    lines = LineReader(process.stdout)
    try:
        with trio.fail_after(120):
            hello: dict[str, Any] = json.loads(await lines.next())
        hello["lines"] = lines
        yield hello
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream, self.buffer = stream, b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                raise EOFError("peer process closed its stdout")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


async def dht_phase(place: Place, n: int, lookups: int) -> dict[str, Any]:
    ip, enter = place.here()
    with enter():  # this thread's sockets (listen and every dial) belong to host n0
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            me = P2PNode(
                Identity.generate(),
                listen=[f"/ip4/{ip}/tcp/0"],
                heartbeat_interval=TIMINGS["heartbeat_interval"],
                peer_timeout=TIMINGS["peer_timeout"],
                discovery_interval=TIMINGS["discovery_interval"],
            )
            addrs = await nursery.start(me.run)
            start = trio.current_time()
            procs = [
                await stack.enter_async_context(peer(place, addrs[0], i < 3)) for i in range(n - 1)
            ]
            spawned = trio.current_time() - start
            with trio.move_on_after(90):
                await me.wait_peer_count(n - 1)
            for proc in procs[:3]:
                with trio.fail_after(60):
                    while await proc["lines"].next() != "EVENT published":
                        pass
            gets, dht_gets, failures, misses = [], [], 0, 0
            for _ in range(lookups):
                for proc in procs[:3]:
                    t = trio.current_time()
                    try:
                        await me.get_record("bench", proc["peer_id"], timeout=30)
                        gets.append(trio.current_time() - t)
                    except (RecordNotFoundError, DeadlineError):
                        failures += 1
                    key = record_key("bench", proc["peer_id"])
                    t = trio.current_time()
                    values = await me._dht.get_all(key)
                    if me._records.best_record(key, values) is None:
                        misses += 1
                    else:
                        dht_gets.append(trio.current_time() - t)
            finds = []
            for _ in range(3):
                t = trio.current_time()
                await me.find_records("bench", timeout=30)
                finds.append(trio.current_time() - t)
            live = len(me.peers())
            nursery.cancel_scope.cancel()
    progress(f"dht: {len(gets)} get_record, {len(dht_gets)} DHT-only lookups")
    return {
        "nodes": n,
        "processes_started_in_s": round(spawned, 1),
        "live_peers_seen": live,
        "get_record": summary(gets),
        "get_record_failures": failures,
        "dht_lookup_only": summary(dht_gets),
        "dht_lookup_misses": misses,
        "find_records_3_publishers": summary(finds),
    }


def vmlend_node(
    place: Place, name: str, base: Path, roles: tuple[str, ...], boot: tuple[str, ...]
) -> LocalNode:
    _, _, host = place.take()
    if place.lab is None:
        return LocalNode(name, base / name, roles, boot)
    return place.lab.node(host, base / name, roles, boot)


async def discovery_phase(place: Place, base: Path, owners: int) -> dict[str, Any]:
    ready, found = [], []
    async with trio.open_nursery() as nursery:
        sched = vmlend_node(place, "sched", base, ("scheduler",), ())
        await sched.start(nursery)
        for i in range(owners):
            owner = vmlend_node(place, f"owner{i}", base, ("owner",), (sched.addrs[0],))
            t = trio.current_time()
            await owner.start(nursery)
            t_ready = trio.current_time()
            with trio.fail_after(120):
                await owner.call("schedulers.wait", {"count": 1, "timeout": 110})
            ready.append(t_ready - t)
            found.append(trio.current_time() - t_ready)
            await owner.stop()
        await sched.stop()
        nursery.cancel_scope.cancel()
    progress(f"discovery: {owners} owners")
    return {"owner_start_to_ready": summary(ready), "ready_to_scheduler_found": summary(found)}


async def main(args: argparse.Namespace) -> None:
    sweep_orphans()
    results: dict[str, Any] = {"bench": "netlab", "nodes": args.nodes}
    with tempfile.TemporaryDirectory(prefix="bench-netlab-") as tmp:
        base = Path(tmp)
        progress("loopback")
        results["loopback"] = {
            "dht": await dht_phase(Place(None), args.nodes, args.lookups),
            "discovery": await discovery_phase(Place(None), base / "lo", args.owners),
        }
        hosts = args.nodes + args.owners + 1
        topology = public_only(hosts, LinkSpec(delay_ms=args.delay_ms))
        async with Lab(topology, test_prefix(), base / "lab") as lab:
            a, b = lab.host("n0"), lab.host("n1")
            echoes = await probe.udp_echoes(a.netns, b.netns, b.ip, count=30, interval=0.02)
            progress(f"lab: {hosts} hosts, measured round trip {summary(echoes.rtts)}")
            results["lab"] = {
                "delay_ms_each_way_per_link": args.delay_ms,
                "measured_rtt": summary(echoes.rtts),
                "dht": await dht_phase(Place(lab), args.nodes, args.lookups),
                "discovery": await discovery_phase(Place(lab), base / "lab", args.owners),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--lookups", type=int, default=10)
    parser.add_argument("--owners", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(main, parser.parse_args())
