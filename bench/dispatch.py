"""Dispatch throughput: leases per second one scheduler grants to many simulated workers. JSON.

    .venv/bin/python bench/dispatch.py [--workers 200] [--tasks 12000] [--dir DIR]

The real :class:`scheduler_role.queue.Queue` on a real sqlite file (WAL, ``synchronous=FULL``, as
the daemon runs it); workers are trio tasks in the same process calling the queue API (no VMs, no
network), each pulling trivial tasks until none is left:

* ``lease_only``: WorkRequest -> LeaseGrant, as fast as the workers can ask;
* ``full_cycle``: lease -> running heartbeat -> result -> judge (the task finishes), replicas 1;
* ``full_cycle_quorum``: the same with replicas 3 / quorum 2 (each task needs three workers).

Baselines in the same run, on the same file system: the rate of one-row ``UPDATE`` transactions
(``BEGIN IMMEDIATE``/``COMMIT``, same pragmas) through the same trio ``Database`` wrapper, and with
plain ``sqlite3`` in a loop (no threads, no trio); and, as the ceiling for group commit, plain
``sqlite3`` doing ``--workers`` UPDATEs per transaction. The queue commits concurrent writes
together (``writes_per_commit``), so it can beat one-transaction-per-write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import trio

from catalog.caps import Caps
from catalog.dispatch import Heartbeat, LeaseGrant, LeaseKey, Offer, ResultReport
from node.store import Database
from scheduler_role.queue import Queue
from scheduler_role.task import Limits, TaskSpec

IMAGE = hashlib.blake2b(b"bench image", digest_size=32).digest()
DIGEST = hashlib.blake2b(b"hello", digest_size=32).digest()
ROOM = Caps(vcpus=2, cpu_share=2.0, memory_mib=2048, disk_mib=4096)
OFFER = Offer(room=ROOM, capacity=ROOM, images=frozenset({IMAGE}))


def task(n: int, replicas: int, quorum: int) -> TaskSpec:
    return TaskSpec(
        task_id=f"task-{n}",
        owner="bench-owner",
        caps=Caps(memory_mib=128),
        image_id=IMAGE,
        limits=Limits(max_runtime=600),
        replicas=replicas,
        quorum=quorum,
    )


def result(lease: LeaseKey) -> ResultReport:
    return ResultReport(
        lease=lease,
        exit_code=0,
        stdout_digest=DIGEST,
        stderr_digest=DIGEST,
        stdout_blob=DIGEST,
        stderr_blob=DIGEST,
        archive_blob=None,
        signature=bytes(64),
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


async def run_workers(
    path: Path, workers: int, tasks: int, *, cycle: bool, replicas: int = 1, quorum: int = 1
) -> dict[str, object]:
    async with Queue.open(path) as queue:

        async def submitter(first: int) -> None:
            for n in range(first, tasks, workers):
                await queue.submit(task(n, replicas, quorum))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:  # owners submitting concurrently
            for first in range(workers):
                nursery.start_soon(submitter, first)
        submit_s = time.perf_counter() - start
        before = queue.statistics()
        latencies: list[float] = []
        finished = 0

        async def worker(name: str) -> None:
            nonlocal finished
            while True:
                t0 = time.perf_counter()
                got = await queue.lease(name, OFFER)
                latencies.append(time.perf_counter() - t0)
                if not isinstance(got, LeaseGrant):
                    return
                if cycle:
                    lease = got.lease
                    await queue.heartbeat(name, Heartbeat(leases=(lease,), running=(lease,)))
                    await queue.report(name, result(lease))
                    finished += 1

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(workers):
                nursery.start_soon(worker, f"worker-{w}")
        elapsed = time.perf_counter() - start
        leases = len(latencies) - workers  # each worker's last request found nothing
        after = queue.statistics()
        commits = after["commits"] - before["commits"]
        writes = after["writes"] - before["writes"]
        done = 0
        if cycle:
            rows = await queue._db.fetchall("SELECT COUNT(*) FROM tasks WHERE state = 'succeeded'")
            done = rows[0][0]
    out: dict[str, object] = {
        "tasks": tasks,
        "replicas": replicas,
        "quorum": quorum,
        "leases": leases,
        "seconds": round(elapsed, 3),
        "leases_per_s": round(leases / elapsed, 1),
        "lease_latency_ms_p50": round(percentile(latencies, 0.5) * 1e3, 2),
        "lease_latency_ms_p99": round(percentile(latencies, 0.99) * 1e3, 2),
        "submits_per_s": round(tasks / submit_s, 1),
        "sqlite_commits": commits,
        "writes_per_commit": round(writes / max(commits, 1), 1),
    }
    if cycle:
        out["tasks_succeeded"] = done
        out["tasks_per_s"] = round(done / elapsed, 1)
        out["results_recorded"] = finished
    return out


async def baseline_trio(path: Path, n: int) -> float:
    schema = [
        "CREATE TABLE c (id INTEGER PRIMARY KEY, v INTEGER NOT NULL); INSERT INTO c VALUES (1, 0);"
    ]
    async with Database.open(path, schema) as db:
        start = time.perf_counter()
        for _ in range(n):
            await db.execute("UPDATE c SET v = v + 1 WHERE id = 1")
        return n / (time.perf_counter() - start)


def baseline_plain(path: Path, n: int, per_txn: int = 1) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        conn.execute("INSERT INTO c VALUES (1, 0)")
        start = time.perf_counter()
        for _ in range(n // per_txn):
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(per_txn):
                conn.execute("UPDATE c SET v = v + 1 WHERE id = 1")
            conn.execute("COMMIT")
        return n // per_txn * per_txn / (time.perf_counter() - start)
    finally:
        conn.close()


async def bench(args: argparse.Namespace, root: Path) -> dict[str, object]:
    trio_rate = await baseline_trio(root / "baseline-trio.db", args.baseline_n)
    plain_rate = baseline_plain(root / "baseline-plain.db", args.baseline_n)
    grouped_rate = baseline_plain(root / "baseline-grouped.db", 100 * args.baseline_n, args.workers)
    lease_only = await run_workers(root / "lease.db", args.workers, args.tasks, cycle=False)
    cycle = await run_workers(root / "cycle.db", args.workers, args.tasks, cycle=True)
    quorum = await run_workers(
        root / "quorum.db", args.workers, args.tasks // 3, cycle=True, replicas=3, quorum=2
    )
    rate = float(lease_only["leases_per_s"])  # type: ignore[arg-type]
    return {
        "workers": args.workers,
        "baseline_trio_update_txn_per_s": round(trio_rate, 1),
        "baseline_plain_sqlite_update_txn_per_s": round(plain_rate, 1),
        "baseline_plain_sqlite_updates_per_s_grouped": round(grouped_rate, 1),
        "lease_only": lease_only,
        "full_cycle": cycle,
        "full_cycle_quorum": quorum,
        "lease_vs_trio_update_txn": round(rate / trio_rate, 3),
        "lease_vs_plain_sqlite_txn": round(rate / plain_rate, 3),
        "filesystem_dir": str(root),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=12000)
    parser.add_argument("--baseline-n", type=int, default=3000)
    parser.add_argument("--dir", type=Path, default=None, help="where the sqlite files go")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="vmlend-bench-dispatch-") as tmp:
        report = trio.run(bench, args, Path(tmp))
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
