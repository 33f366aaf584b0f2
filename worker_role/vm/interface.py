"""The VM backend as the worker agent sees it: start a capped VM for a task, wait for its result.

:class:`Backend` is the whole of what the agent asks of a backend, so the libvirt one
(:func:`worker_role.vm.backend.open_backend`) and an in-memory fake in the tests are
interchangeable. The agent opens its backend through a :class:`BackendFactory` it is given.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from catalog.caps import Caps
from worker_role.egress_proxy import EgressStatistics
from worker_role.policy import LendingPolicy
from worker_role.tinyos import locate
from worker_role.vm.task import GuestCommand, Layer

__all__ = ["Backend", "BackendFactory", "Image", "OutputChunk", "StartedVm", "VmResult"]


@dataclass(frozen=True, slots=True)
class Image:
    """What a VM boots: kernel, initramfs with our init, and read-only layers (top first)."""

    kernel: Path
    initrd: Path
    cmdline: str
    layers: tuple[Layer, ...] = ()

    @classmethod
    def tiny(cls, layers: tuple[Layer, ...] = (), *, data: Path | None = None) -> Image:
        """The built tiny OS (``python -m worker_role.tinyos build``) with ``layers`` on top."""
        t = locate(data)
        return cls(kernel=t.kernel, initrd=t.initrd, cmdline=t.cmdline, layers=layers)


@dataclass(frozen=True, slots=True)
class VmResult:
    exit_code: int
    """The command's exit code; 124 when the guest's time limit killed it."""
    timed_out: bool
    stdout: bytes
    """The last ``OUTPUT_TAIL_BYTES`` of stdout (all of it is streamed to ``output`` live)."""
    stderr: bytes
    out_tar: bytes | None
    """A tar of the guest's /out, or None when it did not fit on the result disk."""
    console_tail: tuple[str, ...]
    elapsed_s: float
    """From domain creation to the result."""
    egress: EgressStatistics | None
    warm: bool = False
    """Whether the VM was restored from a warm snapshot rather than booted."""


OutputChunk = tuple[str, bytes]
"""("stdout" | "stderr", bytes), as the guest wrote them."""


class StartedVm(Protocol):
    """A VM that is running a task, valid inside :meth:`Backend.start`."""

    @property
    def name(self) -> str: ...

    @property
    def warm(self) -> bool:
        """Whether it was restored from a warm snapshot rather than booted."""
        ...

    async def wait(self) -> VmResult:
        """The task's result once the guest finishes. Raises :class:`VmError` when there is
        none (``GuestFailedError``, ``GuestTimeoutError`` past the time limit)."""
        ...


class Backend(Protocol):
    @property
    def problem(self) -> str | None:
        """Why this backend cannot run VMs now (libvirtd unreachable, say), or None."""
        ...

    async def heal(self) -> None:
        """Try to get back to running VMs (reconnect to libvirtd); :attr:`problem` then says
        whether it worked. Raises nothing."""
        ...

    def start(
        self,
        image: Image,
        task: GuestCommand,
        caps: Caps,
        *,
        output: trio.MemorySendChannel[OutputChunk] | None = None,
    ) -> AbstractAsyncContextManager[StartedVm]:
        """Start a VM that boots ``image`` and runs ``task`` held to ``caps``, streaming the
        guest's output to ``output``. Leaving the block, however it is left (cancelled by a
        stop, say), destroys the VM and deletes its files.

        Refuses before anything runs: ``PolicyViolation`` when ``caps`` next to the VMs already
        running would exceed the backend's lending policy, ``CapUnsupportedError`` (a
        :class:`VmError`) when this machine cannot enforce them.
        """
        ...


class BackendFactory(Protocol):
    def __call__(
        self, *, runtime_dir: Path, policy: LendingPolicy
    ) -> AbstractAsyncContextManager[Backend]:
        """Open a backend that keeps its VMs' files under ``runtime_dir`` and refuses VMs beyond
        ``policy``. Raises :class:`WorkerError` when this machine cannot run VMs at all."""
        ...
