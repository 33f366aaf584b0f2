"""The scheduler's sqlite schema (``<data>/scheduler.db``) and the mapping of rows to objects.

Numbered migrations for :meth:`node.store.Database.open`; never edit a released one, append.
Tasks are ordered by ``seq`` (submission order, which is also the order replicas are leased in);
replicas and results refer to it. ``tasks.open`` is 1 while a replica is queued: the lease query
walks only open tasks (a partial index), so its cost does not grow with the tasks already leased.
A task's resource needs are columns as well as JSON so the lease query can filter in SQL before
the exact policy check in Python. Times stored here are wall-clock
(Unix seconds): they must mean something after a restart, unlike the monotonic lease deadlines.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from catalog.caps import Caps, NetworkMode
from node.errors import LocalProtocolError, StoreError
from scheduler_role.lifecycle import Replica, ReplicaState
from scheduler_role.task import Limits, TaskSpec

MIGRATIONS: list[str] = [
    """
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        image_id TEXT,
        caps TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        network INTEGER NOT NULL,
        max_runtime REAL NOT NULL,
        deadline REAL,
        max_attempts INTEGER NOT NULL,
        replicas INTEGER NOT NULL,
        quorum INTEGER NOT NULL,
        state TEXT NOT NULL,
        open INTEGER NOT NULL DEFAULT 1,
        verdict TEXT,
        reason TEXT NOT NULL DEFAULT '',
        agreed BLOB,
        submitted_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX tasks_open ON tasks (seq) WHERE state = 'active' AND open = 1;
    CREATE INDEX tasks_open_by_image ON tasks (image_id, seq) WHERE state = 'active' AND open = 1;
    CREATE INDEX tasks_by_deadline ON tasks (deadline)
        WHERE state IN ('submitted', 'assembling', 'active') AND deadline IS NOT NULL;
    CREATE TABLE replicas (
        task_seq INTEGER NOT NULL REFERENCES tasks (seq),
        idx INTEGER NOT NULL,
        state TEXT NOT NULL,
        worker TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        since REAL,  -- wall time of the lease, then of its VM's start: max runtime counts from it
        PRIMARY KEY (task_seq, idx)
    ) WITHOUT ROWID;
    CREATE INDEX replicas_by_worker ON replicas (worker) WHERE worker IS NOT NULL;
    CREATE TABLE results (
        arrival INTEGER PRIMARY KEY,
        task_seq INTEGER NOT NULL REFERENCES tasks (seq),
        idx INTEGER NOT NULL,
        worker TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        exit_code INTEGER NOT NULL,
        stdout_digest BLOB NOT NULL,
        stderr_digest BLOB NOT NULL,
        stdout_blob BLOB NOT NULL,
        stderr_blob BLOB NOT NULL,
        archive_blob BLOB,
        signature BLOB NOT NULL,
        digest BLOB NOT NULL,
        received_at REAL NOT NULL,
        UNIQUE (task_seq, idx, worker)
    );
    CREATE INDEX results_by_worker ON results (task_seq, worker);
    """,
    # Placement and trust (scheduler_role.trust): the network each lease and result came from,
    # whether the result's worker was trusted when it reported, a task's allow-list of workers,
    # the networks barred from a task, and every worker's record.
    """
    ALTER TABLE replicas ADD COLUMN network TEXT;
    ALTER TABLE results ADD COLUMN network TEXT;
    ALTER TABLE results ADD COLUMN trusted INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tasks ADD COLUMN workers TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX replicas_by_network ON replicas (network) WHERE network IS NOT NULL;
    CREATE TABLE strikes (
        task_seq INTEGER NOT NULL REFERENCES tasks (seq),
        network TEXT NOT NULL,
        PRIMARY KEY (task_seq, network)
    ) WITHOUT ROWID;
    CREATE TABLE workers (
        peer_id TEXT PRIMARY KEY,
        agreed INTEGER NOT NULL DEFAULT 0,
        disagreed INTEGER NOT NULL DEFAULT 0,
        lost INTEGER NOT NULL DEFAULT 0,
        expired INTEGER NOT NULL DEFAULT 0,
        streak INTEGER NOT NULL DEFAULT 0,
        network TEXT,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # Faults that heal (issue 15): leases that ended before their VM started (spending no task
    # attempt), each worker's run of such failures and the time it is sidelined until, every
    # lease granted (who held which attempt: a lapsed lease's result may still count), and
    # whether a result came after its lease had lapsed.
    """
    ALTER TABLE replicas ADD COLUMN start_failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE workers ADD COLUMN start_failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE workers ADD COLUMN sidelined_until REAL;
    ALTER TABLE results ADD COLUMN late INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE lease_history (
        task_seq INTEGER NOT NULL REFERENCES tasks (seq),
        idx INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        worker TEXT NOT NULL,
        network TEXT,
        outcome TEXT,  -- NULL while held; expired, lost, start_failed, reported
        PRIMARY KEY (task_seq, idx, attempt)
    ) WITHOUT ROWID;
    CREATE INDEX lease_history_start_failed ON lease_history (task_seq, worker)
        WHERE outcome = 'start_failed';
    """,
]

TASK_COLUMNS = (
    "seq, task_id, owner, image_id, caps, max_runtime, deadline, max_attempts, replicas, quorum,"
    " state, verdict, reason, agreed, workers"
)


def spec_values(spec: TaskSpec) -> dict[str, Any]:
    """The columns of ``spec`` for an INSERT into ``tasks``."""
    return {
        "task_id": spec.task_id,
        "owner": spec.owner,
        "image_id": spec.image_id.hex() if spec.image_id is not None else None,
        "caps": json.dumps(spec.caps.to_wire(), sort_keys=True),
        "vcpus": spec.caps.vcpus,
        "memory_mib": spec.caps.memory_mib,
        "disk_mib": spec.caps.disk_mib,
        "network": int(spec.caps.network is NetworkMode.PROXY),
        "max_runtime": spec.limits.max_runtime,
        "deadline": spec.limits.deadline,
        "max_attempts": spec.limits.max_attempts,
        "replicas": spec.replicas,
        "quorum": spec.quorum,
        "workers": json.dumps(sorted(spec.workers)),
    }


def spec_from_row(row: sqlite3.Row | tuple[Any, ...]) -> TaskSpec:
    """Rebuild the spec from a row selected with :data:`TASK_COLUMNS`."""
    _, task_id, owner, image_hex, caps_json, max_runtime, deadline, attempts, replicas, quorum = (
        row[:10]
    )
    try:
        caps = Caps.from_wire(json.loads(caps_json))
    except (LocalProtocolError, ValueError) as e:
        raise StoreError(f"task {task_id}: stored caps are invalid: {e}") from e
    return TaskSpec(
        task_id=task_id,
        owner=owner,
        caps=caps,
        image_id=bytes.fromhex(image_hex) if image_hex is not None else None,
        limits=Limits(max_runtime=max_runtime, deadline=deadline, max_attempts=attempts),
        replicas=replicas,
        quorum=quorum,
        workers=frozenset(json.loads(row[14])),
    )


def load_replicas(conn: sqlite3.Connection, seq: int) -> list[Replica]:
    rows = conn.execute(
        "SELECT idx, state, worker, attempts, reason, start_failures FROM replicas"
        " WHERE task_seq = ? ORDER BY idx",
        (seq,),
    ).fetchall()
    return [Replica(idx, ReplicaState(state), worker, attempts, reason, failures) for idx, state,
            worker, attempts, reason, failures in rows]  # fmt: skip


def save_replica(conn: sqlite3.Connection, seq: int, replica: Replica, since: float | None) -> None:
    conn.execute(
        "UPDATE replicas SET state = ?, worker = ?, attempts = ?, reason = ?, since = ?,"
        " start_failures = ?, network = CASE WHEN worker IS ? THEN network END"
        " WHERE task_seq = ? AND idx = ?",
        (replica.state.value, replica.worker, replica.attempts, replica.reason, since,
         replica.start_failures, replica.worker, seq, replica.index),
    )  # fmt: skip
    conn.execute(
        "UPDATE tasks SET open = EXISTS (SELECT 1 FROM replicas WHERE task_seq = ? AND state = ?)"
        " WHERE seq = ?",
        (seq, ReplicaState.QUEUED.value, seq),
    )
