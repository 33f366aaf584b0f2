"""Errors of the worker role: lending policy, VM backend, tiny OS, guest.

Third-party errors (``libvirt.libvirtError``, ``OSError`` from QEMU's files) are translated into
these at the boundary of :mod:`worker_role.vm`.
"""

from __future__ import annotations

from collections.abc import Sequence

from node.errors import VmlendError


class WorkerError(VmlendError):
    """Root of the worker role's errors."""


class TinyOsError(WorkerError):
    """The tiny OS could not be built, verified or found.

    The fix is usually ``python -m worker_role.tinyos build``.
    """


class VmError(WorkerError):
    """The VM backend or libvirt/QEMU failed (something outside the task)."""


class VmSetupError(VmError):
    """This machine is not set up for VMs: libvirt unreachable, a path QEMU cannot reach, ..."""


class CapUnsupportedError(VmError):
    """A task needs a cap this machine cannot enforce; ``caps`` names which ones and why."""

    def __init__(self, unsupported: dict[str, str]) -> None:
        why = "; ".join(f"{name}: {reason}" for name, reason in sorted(unsupported.items()))
        super().__init__(f"caps not enforceable on this machine: {why}")
        self.unsupported = dict(unsupported)


class GuestFailedError(VmError):
    """The guest ended without a result (crash, kernel panic, hang, bad init).

    ``console_tail`` holds the last lines of the guest's serial console, the evidence of why.
    """

    def __init__(self, message: str, *, console_tail: Sequence[str] = ()) -> None:
        tail = "\n".join(console_tail)
        super().__init__(f"{message}\n--- last console lines ---\n{tail}" if tail else message)
        self.reason = message
        self.console_tail = tuple(console_tail)


class GuestTimeoutError(GuestFailedError):
    """The guest gave no result within its time limit plus the boot allowance: a hang, which the
    host ended by destroying the VM (a command that merely overran its limit exits 124 instead)."""
