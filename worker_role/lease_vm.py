"""One lease's VM on a worker: what the agent knows of the lease while it runs, and the task that
runs its VM, hands its result over the moment the guest gives it (its output all forwarded
first), and only then tears it down, so that the result is reported while the VM goes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from catalog.caps import Caps
from catalog.dispatch import LeaseGrant, ResultReport
from node.supervise import one_error
from worker_role.errors import VmError
from worker_role.lease_output import StreamOpener, forward_logs
from worker_role.vm.interface import Backend, Image, OutputChunk, VmResult
from worker_role.vm.task import GuestCommand

log = logging.getLogger("vmlend.worker.agent")


@dataclass
class Lease:
    caps: Caps | None  # None for a finished one read back after a restart: it takes no room
    lease_timeout: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    running: bool = False
    step: str = "fetching its image"  # what it is doing, for the error if it fails
    fetched: int = 0  # bytes of its image on disk so far (told to its scheduler)
    report: ResultReport | None = None  # finished: kept until its scheduler has it
    finished: bool = False  # its VM gave its result: being reported (and the VM torn down)
    vm_gone: bool = False  # its VM torn down after its result: the room it took is free


@dataclass(frozen=True)
class LeaseHooks:
    poke: Callable[[], None]  # the lease's state moved (its VM runs)
    room_changed: Callable[[], None]  # the room it took is free again


async def run_vm(
    backend: Backend,
    p2p: StreamOpener,
    scheduler: str,
    grant: LeaseGrant,
    image: Image,
    task: GuestCommand,
    lease: Lease,
    hooks: LeaseHooks,
    *,
    task_status: trio.TaskStatus[VmResult],
) -> None:
    """Run the lease's VM (start it with ``nursery.start``, which returns its result); a
    failure before the result is raised to the caller, one in tearing down is logged."""
    handed = False
    send, receive = trio.open_memory_channel[OutputChunk](256)
    forwarded = trio.Event()

    async def forward() -> None:
        try:
            await forward_logs(p2p, scheduler, grant.lease, receive)
        finally:
            forwarded.set()

    try:
        async with one_error(), trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            async with backend.start(image, task, grant.caps, output=send) as vm:
                async with send:
                    lease.running = True
                    lease.step = "while its VM ran"
                    hooks.poke()
                    how = "restored from a warm snapshot" if vm.warm else "booted"
                    log.info("lease %s runs in %s (%s)", grant.lease, vm.name, how)
                    result = await vm.wait()
                log.info("lease %s ended in its VM: exit code %s", grant.lease, result.exit_code)
                await forwarded.wait()  # all its output is with the scheduler before the result
                lease.finished = handed = True
                task_status.started(result)
    except (VmError, OSError) as e:
        if not handed:
            raise  # the caller's: the lease failed
        # The result stands and is on its way: a VM that would not go is the backend's to
        # sweep (its domains are swept when it opens), not a reason to end the agent.
        log.warning("lease %s: tearing its VM down: %s", grant.lease, e)
    finally:
        if handed:  # else the lease failed, and takes its room until the agent lets it go
            lease.vm_gone = True
            hooks.room_changed()
