"""The VM backend: capped libvirt/QEMU VMs that run one task each (DESIGN.md steps 6-8, 11).

Public surface: :func:`open_backend` / :class:`VmBackend` to run tasks, :func:`probe_accelerator`
for ``vmlend doctor``, the sans-IO :mod:`worker_role.vm.domain_xml` and :mod:`worker_role.vm.task`.
"""

from __future__ import annotations

from worker_role.errors import GuestFailedError, GuestTimeoutError
from worker_role.vm.accel import AccelChoice, probe_accelerator
from worker_role.vm.backend import Image, RunningVm, VmBackend, VmResult, open_backend
from worker_role.vm.domain_xml import Accel
from worker_role.vm.task import GuestCommand, Layer, LayerFormat

__all__ = [
    "Accel",
    "AccelChoice",
    "GuestCommand",
    "GuestFailedError",
    "GuestTimeoutError",
    "Image",
    "Layer",
    "LayerFormat",
    "RunningVm",
    "VmBackend",
    "VmResult",
    "open_backend",
    "probe_accelerator",
]
