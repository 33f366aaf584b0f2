"""``vmlend`` with a dishonest worker: every result it reports has a wrong stdout.

Run as ``python wrong_result_node.py node start ...`` in place of ``vmlend node start ...``. It is
the real command; only the VM backend the node hands its worker agent is wrapped, so the wrong
result reaches the agent the way any backend's result does, and production code has no fault hook.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

import node.daemon
from catalog.caps import Caps
from node.cli import main
from worker_role.vm.backend import open_backend
from worker_role.vm.interface import Backend, Image, OutputChunk, StartedVm, VmResult
from worker_role.vm.task import GuestCommand

WRONG_STDOUT = b"a wrong result\n"
BANNER = "fault: every result this worker reports has a wrong stdout"


class _WrongVm:
    def __init__(self, vm: StartedVm) -> None:
        self._vm = vm

    @property
    def name(self) -> str:
        return self._vm.name

    @property
    def warm(self) -> bool:
        return self._vm.warm

    async def wait(self) -> VmResult:
        return dataclasses.replace(await self._vm.wait(), stdout=WRONG_STDOUT)


class _WrongBackend:
    """The real backend in every respect but the stdout of its results."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def problem(self) -> str | None:
        return self._backend.problem

    async def heal(self) -> None:
        await self._backend.heal()

    @asynccontextmanager
    async def start(
        self,
        image: Image,
        task: GuestCommand,
        caps: Caps,
        *,
        output: trio.MemorySendChannel[OutputChunk] | None = None,
    ) -> AsyncIterator[StartedVm]:
        async with self._backend.start(image, task, caps, output=output) as vm:
            yield _WrongVm(vm)


@asynccontextmanager
async def open_wrong_backend(**options: Any) -> AsyncIterator[Backend]:
    """The real backend, wrapped; says so once the node's worker agent has opened it."""
    backend: AbstractAsyncContextManager[Backend] = open_backend(**options)
    async with backend as real:
        print(BANNER, flush=True)
        yield _WrongBackend(real)


if __name__ == "__main__":
    node.daemon.open_backend = open_wrong_backend  # type: ignore[assignment]
    sys.exit(main())
