from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from catalog.caps import Caps, NetworkMode
from catalog.dispatch import LeaseKey, Offer, ResultReport
from scheduler_role.queue import Queue
from scheduler_role.task import Limits, TaskSpec
from scheduler_role.trust import LAB

BASE_WALL = 1_800_000_000.0


class VirtualClock:
    """trio's (virtual, under autojump_clock) time for leases; a wall clock that moves with it."""

    def monotonic(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return BASE_WALL + trio.current_time()


def image(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=32).digest()


def spec(
    task_id: str = "t1",
    *,
    memory_mib: int = 256,
    vcpus: int = 1,
    network: bool = False,
    image_id: bytes | None = image(0),
    replicas: int = 1,
    quorum: int = 1,
    max_attempts: int = 3,
    max_runtime: float = 600.0,
    deadline: float | None = None,
) -> TaskSpec:
    caps = Caps(
        vcpus=vcpus,
        cpu_share=1.0,
        memory_mib=memory_mib,
        network=NetworkMode.PROXY if network else NetworkMode.NONE,
        net_allow=("example.org:443",) if network else (),
    )
    limits = Limits(max_runtime=max_runtime, deadline=deadline, max_attempts=max_attempts)
    return TaskSpec(
        task_id=task_id,
        owner="owner1",
        caps=caps,
        image_id=image_id,
        limits=limits,
        replicas=replicas,
        quorum=quorum,
    )


def offer(
    *, memory_mib: int = 1024, vcpus: int = 2, network: bool = False, images: tuple[bytes, ...] = ()
) -> Offer:
    room = Caps(
        vcpus=vcpus,
        cpu_share=float(vcpus),
        memory_mib=memory_mib,
        disk_mib=4096,
        network=NetworkMode.PROXY if network else NetworkMode.NONE,
        net_allow=("*",) if network else (),
    )
    return Offer(room=room, capacity=room, images=frozenset(images))


def digest_of(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=32).digest()


def report(lease: LeaseKey, *, stdout: str = "ok", exit_code: int = 0) -> ResultReport:
    return ResultReport(
        lease=lease,
        exit_code=exit_code,
        stdout_digest=digest_of(stdout),
        stderr_digest=digest_of(""),
        stdout_blob=digest_of("blob:" + stdout),
        stderr_blob=digest_of("blob:"),
        archive_blob=None,
        signature=bytes(64),
    )


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    async with Queue.open(tmp_path / "scheduler.db", clock=VirtualClock(), policy=LAB) as q:
        yield q
