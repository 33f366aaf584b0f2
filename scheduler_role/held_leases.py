"""The leases a scheduler's workers hold right now, in memory.

Their deadlines are monotonic and a heartbeat must not cost a disk write, so they live here rather
than in the database (see :mod:`scheduler_role.queue`); the count per worker is kept alongside,
because every work request asks it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from catalog.dispatch import LeaseKey
from scheduler_role.queue_ops import StopNotice
from scheduler_role.queue_types import HeldLease


class HeldLeases:
    def __init__(self) -> None:
        self._by_key: dict[LeaseKey, HeldLease] = {}
        self._count: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[LeaseKey]:
        return iter(list(self._by_key))  # callers release while iterating

    def get(self, lease: LeaseKey) -> HeldLease | None:
        return self._by_key.get(lease)

    def items(self) -> list[tuple[LeaseKey, HeldLease]]:
        return list(self._by_key.items())

    def count(self, worker: str) -> int:
        return self._count.get(worker, 0)

    def per_worker(self) -> dict[str, int]:
        return dict(self._count)

    def hold(self, lease: LeaseKey, held: HeldLease) -> None:
        self.release(lease)
        self._by_key[lease] = held
        self._count[held.worker] = self._count.get(held.worker, 0) + 1

    def release(self, lease: LeaseKey) -> None:
        held = self._by_key.pop(lease, None)
        if held is not None:
            left = self._count[held.worker] - 1
            if left:
                self._count[held.worker] = left
            else:
                del self._count[held.worker]

    def release_stopped(self, stops: Iterable[StopNotice]) -> None:
        for stop in stops:
            self.release(stop.lease)
