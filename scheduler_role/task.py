"""What the scheduler needs to know about a task (the task file is mapped onto :class:`TaskSpec`).

The task file (``catalog.taskfile``) says much more (OS, packages, command, files); the scheduler
only places and judges, so it keeps the image to run, the caps to run it under, the limits and the
replication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from catalog.caps import Caps
from catalog.dispatch import MAX_REPLICAS
from node.wire_fields import ID_RE
from scheduler_role.errors import InvalidTaskError

MAX_ATTEMPTS = 100
IMAGE_ID_SIZE = 32
MAX_ALLOWED_WORKERS = 64


def check_id(kind: str, value: object) -> str:
    """Task IDs and peer IDs: 1-128 characters of [A-Za-z0-9._:-], not starting with a symbol."""
    if type(value) is not str or not ID_RE.fullmatch(value):
        raise InvalidTaskError(f"{kind} must be 1-128 characters of [A-Za-z0-9._:-], got {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """``max_runtime``: seconds one replica may run (from its lease) before it is failed.

    ``deadline``: absolute wall-clock time (Unix seconds) after which the task fails if it has no
    verdict; ``None`` for none. ``max_attempts``: leases per replica before the replica fails.
    """

    max_runtime: float = 3600.0
    deadline: float | None = None
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_runtime) and self.max_runtime > 0):
            raise InvalidTaskError(f"max_runtime must be > 0 seconds, got {self.max_runtime}")
        if self.deadline is not None and not math.isfinite(self.deadline):
            raise InvalidTaskError(f"deadline must be a finite time, got {self.deadline}")
        if type(self.max_attempts) is not int or not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise InvalidTaskError(
                f"max_attempts must be in [1, {MAX_ATTEMPTS}], got {self.max_attempts}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """One task as the scheduler sees it.

    ``image_id`` is ``None`` while the scheduler still has to assemble the image. Each of the
    ``replicas`` runs on a different worker; the task succeeds once ``quorum`` of them agree.
    ``workers``: the only peers that may run it (empty: any); the owner vouches for them, so
    their results count as trusted.
    """

    task_id: str
    owner: str
    caps: Caps
    image_id: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    replicas: int = 1
    quorum: int = 1
    workers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        check_id("task_id", self.task_id)
        check_id("owner", self.owner)
        if self.image_id is not None and (
            type(self.image_id) is not bytes or len(self.image_id) != IMAGE_ID_SIZE
        ):
            raise InvalidTaskError(f"image_id must be {IMAGE_ID_SIZE} bytes")
        if type(self.replicas) is not int or not 1 <= self.replicas <= MAX_REPLICAS:
            raise InvalidTaskError(f"replicas must be in [1, {MAX_REPLICAS}], got {self.replicas}")
        if type(self.quorum) is not int or not 1 <= self.quorum <= self.replicas:
            raise InvalidTaskError(
                f"quorum must be in [1, replicas={self.replicas}], got {self.quorum}"
            )
        if not isinstance(self.workers, frozenset) or len(self.workers) > MAX_ALLOWED_WORKERS:
            raise InvalidTaskError(f"workers must be a set of at most {MAX_ALLOWED_WORKERS}")
        for worker in self.workers:
            check_id("a worker", worker)
