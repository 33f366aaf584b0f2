"""Forgetting finished tasks, so that what owners and workers made a scheduler store is not kept
forever and an owner's quota (:mod:`catalog.peer_quota`) frees up again.

A finished task (succeeded, failed or cancelled) is kept ``keep_finished`` after it ended
(``[scheduler] keep_finished``, 7 days by default), for its owner to read its status, results and
logs. Then the sweep forgets it, in this order:

1. its directory ``<data>/tasks/<task ID>`` (the task and the files its owner shipped) is removed;
2. every charge made for it is released (its counted results, charged to its owner, and what a
   worker's result for it left behind); each blob that leaves uncharged and that a peer's word
   brought here is removed and its chunks collected (:func:`catalog.blob_fetch.discard_blob`) --
   except one a result of another task still names (identical outputs are one blob): the owner
   of that task is charged for it instead;
3. the queue marks the task collected and deletes it and every row about it; its owner's status,
   results, wait, cancel or logs then answer ``unknown_task``, saying that finished tasks are
   forgotten after ``keep_finished``; its ID may be used again.

A crash between the steps is harmless: the task stays in the queue until step 3, and the next
sweep repeats steps 1 and 2, which change nothing the second time.

The sweep runs every ``min(keep_finished / 10, 1 h)``, by the queue's clock (its wall clock is the
one ``finished_at`` is written with; tests give the queue a virtual one). The choices are the
sans-IO functions here (:func:`sweep_interval`, :func:`cutoff`, :func:`settle_freed`);
:class:`Retention` is the glue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from catalog.blob import BlobId
from catalog.blob_fetch import discard_blob
from catalog.errors import CatalogError
from node.contained import contained
from node.supervise import run_contained
from scheduler_role.task_store import discard

if TYPE_CHECKING:
    from catalog.blob_service import BlobService
    from scheduler_role.queue import Queue

log = logging.getLogger("vmlend.scheduler.retention")

DEFAULT_KEEP_FINISHED = 7 * 86400.0
MAX_SWEEP_INTERVAL = 3600.0
MIN_SWEEP_INTERVAL = 0.1  # a lab's keep_finished of a second must not spin the sweep
SWEEP_BATCH = 256  # tasks forgotten per round of one sweep (each round one query)


def sweep_interval(keep_finished: float) -> float:
    """How often to sweep: a task outlives ``keep_finished`` by at most a tenth of it (1 h at
    most)."""
    return max(MIN_SWEEP_INTERVAL, min(keep_finished / 10, MAX_SWEEP_INTERVAL))


def cutoff(now_wall: float, keep_finished: float) -> float:
    """Tasks that finished at or before this wall-clock time are due to be forgotten."""
    return now_wall - keep_finished


@dataclass(frozen=True, slots=True)
class Recharge:
    """A freed blob another task's result still names: charged to that task's owner."""

    blob: BlobId
    task_id: str
    owner: str


def settle_freed(
    freed: Iterable[BlobId], users: Mapping[bytes, tuple[str, str]]
) -> tuple[list[BlobId], list[Recharge]]:
    """Split the blobs that releasing a task's charges freed into those to remove and those
    still named by another task's result (``users``: blob -> (task ID, owner))."""
    remove: list[BlobId] = []
    recharge: list[Recharge] = []
    for blob in dict.fromkeys(freed):
        user = users.get(bytes(blob))
        if user is None:
            remove.append(blob)
        else:
            recharge.append(Recharge(blob, *user))
    return remove, recharge


class Retention:
    """The sweep of one scheduler. Start :meth:`serve` in the scheduler's nursery."""

    def __init__(
        self,
        queue: Queue,
        blobs: BlobService,
        tasks_dir: Path,
        *,
        keep_finished: float = DEFAULT_KEEP_FINISHED,
        on_forgotten: Callable[[str], object] = lambda task_id: None,
    ) -> None:
        if keep_finished <= 0:
            raise ValueError(f"keep_finished must be above 0, got {keep_finished}")
        self.queue = queue
        self.blobs = blobs
        self.tasks_dir = tasks_dir
        self.keep_finished = keep_finished
        self._on_forgotten = on_forgotten
        self.forgotten = 0
        """Tasks forgotten since the start (for statistics and tests)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Service: :meth:`sweep` every :func:`sweep_interval`; runs until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(sweep_interval(self.keep_finished))
            await self.sweep()

    async def sweep(self, *, now: float | None = None) -> list[str]:
        """Forget every task that finished ``keep_finished`` before ``now`` (wall-clock; the
        queue's clock by default) or earlier; their IDs.

        A task whose forgetting failed stays for the next sweep (a bug in it is logged with
        its traceback; the other tasks are still forgotten)."""
        wall = self.queue.clock.wall() if now is None else now
        before = cutoff(wall, self.keep_finished)
        done: list[str] = []
        while True:
            due = await self.queue.finished_before(before, limit=SWEEP_BATCH)
            for task_id in due:
                forgotten = False

                async def forget(task_id: str = task_id) -> None:
                    nonlocal forgotten
                    forgotten = await self.forget(task_id)

                await run_contained(log, f"forgetting {task_id}", forget)
                if forgotten:
                    done.append(task_id)
            # A task that could not be forgotten comes first in the next round: stop there.
            if len(due) < SWEEP_BATCH or not set(due) <= set(done):
                break
        if done:
            log.info(
                "forgot %d task(s) finished more than %.0f s ago", len(done), self.keep_finished
            )
        return done

    async def forget(self, task_id: str) -> bool:
        """Forget one finished task (the steps in the module docstring); False if it is kept
        for now."""
        try:
            await trio.to_thread.run_sync(discard, contained(self.tasks_dir, task_id))
        except OSError as e:
            # Not ours to fix (a mount, permissions): keep the task, so the next sweep retries.
            log.warning("task %s: its directory cannot be removed (%s); kept for now", task_id, e)
            return False
        quota = self.blobs.peer_quota
        freed = await quota.release_task(task_id)
        users = await self.queue.result_blob_users(map(bytes, freed), besides=task_id)
        remove, recharge = settle_freed(freed, users)
        for each in recharge:
            size = await self._size_of(each.blob)
            await quota.charge(each.owner, each.blob, size, created=True, task=each.task_id)
        for blob in remove:
            await discard_blob(self.blobs, blob)
        await self.queue.forget(task_id)
        self.forgotten += 1
        self._on_forgotten(task_id)
        return True

    async def _size_of(self, blob: BlobId) -> int:
        try:
            return (await self.blobs.blobs.manifest(blob)).total_size
        except CatalogError:
            return 0  # not here any more: nothing to charge for, only the reference to keep


__all__ = [
    "DEFAULT_KEEP_FINISHED",
    "Recharge",
    "Retention",
    "cutoff",
    "settle_freed",
    "sweep_interval",
]
