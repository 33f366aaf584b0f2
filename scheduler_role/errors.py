"""The scheduler's errors: a subtree of :class:`node.errors.VmlendError`.

They say whose fault a failure is: the caller asked for a move the lifecycle forbids
(:class:`InvalidTransition`), named something unknown (:class:`UnknownTaskError`), or reused a
task ID for a different task (:class:`TaskConflictError`). Wire-level violations by a peer stay
:class:`node.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from node.errors import VmlendError


class SchedulerError(VmlendError):
    """Root of every error raised by ``scheduler_role``."""


class InvalidTransition(SchedulerError):
    """An event that the lifecycle table has no transition for in the current state."""

    def __init__(self, machine: str, state: str, event: str) -> None:
        super().__init__(f"{machine}: no transition for event {event!r} in state {state!r}")
        self.machine = machine
        self.state = state
        self.event = event


class InvalidTaskError(SchedulerError, ValueError):
    """A task description is malformed (bad ID, quorum above replicas, negative runtime...)."""


class TaskConflictError(SchedulerError):
    """A task ID was submitted again with a different description (submit is idempotent by ID)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} already exists with a different description")
        self.task_id = task_id


class UnknownTaskError(SchedulerError):
    """No task with this ID is in the queue."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task {task_id} in the queue")
        self.task_id = task_id
