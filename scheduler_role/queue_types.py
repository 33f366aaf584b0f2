"""The values the task queue (:mod:`scheduler_role.queue`) hands out and keeps, apart from its
logic: its clock, a task's status, a stored result, a held lease, a worker's last offer."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Protocol

import trio

from catalog.dispatch import Offer
from scheduler_role.end_conditions import Outcome
from scheduler_role.lifecycle import Replica, TaskState
from scheduler_role.task import TaskSpec


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> float: ...


class TrioClock:
    """trio's clock for leases (virtual under ``autojump_clock``), the system's for the disk."""

    def monotonic(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return time.time()


@dataclass(frozen=True, slots=True)
class StoredResult:
    replica: int
    worker: str
    attempt: int
    exit_code: int
    stdout_digest: bytes
    stderr_digest: bytes
    stdout_blob: bytes
    stderr_blob: bytes
    archive_blob: bytes | None
    signature: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class TaskStatus:
    spec: TaskSpec
    state: TaskState
    verdict: Outcome | None
    reason: str
    replicas: tuple[Replica, ...]
    agreed: bytes | None
    dissenters: tuple[str, ...]
    reported: tuple[str, ...]  # workers whose result was counted, in arrival order
    submitted_at: float = 0.0  # wall clock
    running_since: float | None = None  # wall clock: the earliest replica running now
    finished_at: float | None = None  # wall clock


@dataclass(slots=True)
class HeldLease:
    worker: str
    deadline: float  # monotonic: expires unless heartbeated before
    since: float  # monotonic: when the lease was granted, then when its VM started
    max_runtime: float
    running: bool = False  # the worker said its VM runs (persisted once)
    fetched: int = 0  # bytes of the image the worker says it has fetched (kept in memory only)


@dataclass(frozen=True, slots=True)
class SeenOffer:
    offer: Offer
    at: float  # monotonic


def tables_with(conn: sqlite3.Connection, column: str) -> list[str]:
    """The tables of this database that have ``column`` (every table about one task has
    ``task_seq``): forgetting a task reaches tables added by later migrations too."""
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return [
        name
        for name in names
        if any(col[1] == column for col in conn.execute(f"PRAGMA table_info({name})"))
    ]
