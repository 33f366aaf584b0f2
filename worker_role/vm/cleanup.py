"""Finding and removing what a crashed vmlend left behind.

Everything the backend creates is recognisably ours: domains are named ``vmlend-*`` and carry our
metadata element with the owning process (pid + start time); each VM's files live in
``<runtime>/vmlend-*/`` with an ``owner.json``. A leftover is ours and its owner is gone. Domains of
a live owner (another worker, a test run in parallel) are left alone.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import psutil

from worker_role.vm.domain_xml import NAME_PREFIX, Owner, parse_owner

log = logging.getLogger("vmlend.worker.vm")


@dataclass(slots=True)
class SweepReport:
    destroyed: list[str] = field(default_factory=list)
    removed_dirs: list[str] = field(default_factory=list)


def this_process() -> Owner:
    me = psutil.Process()
    return Owner(pid=me.pid, started=me.create_time())


def owner_alive(owner: Owner) -> bool:
    try:
        started = psutil.Process(owner.pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    # create_time is derived from boot time and clock ticks; equal within rounding.
    return bool(abs(started - owner.started) < 0.05)


def sweep(raw_conn: Any, runtime: Path) -> SweepReport:
    """Destroy our domains whose owner is dead, then remove our dirs with no live domain.

    Blocking: run it in a thread.
    """
    report = SweepReport()
    live: set[str] = set()
    for dom in raw_conn.listAllDomains(0):
        name = dom.name()
        if not name.startswith(NAME_PREFIX):
            continue
        try:
            owner = parse_owner(dom.XMLDesc(0))
        except libvirt.libvirtError:
            continue  # it went away while we looked
        if owner is None:
            log.warning("domain %s has our prefix but not our metadata; leaving it", name)
            continue
        if owner_alive(owner):
            live.add(name)
            continue
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
        report.destroyed.append(name)
        log.info("removed leftover domain %s of dead owner pid %d", name, owner.pid)
    if runtime.is_dir():
        for d in runtime.iterdir():
            if not (d.is_dir() and d.name.startswith(NAME_PREFIX)) or d.name in live:
                continue
            owner = _dir_owner(d)
            if owner is not None and owner_alive(owner):
                continue
            shutil.rmtree(d, ignore_errors=True)
            report.removed_dirs.append(d.name)
            log.info("removed leftover VM directory %s", d)
    return report


def _dir_owner(d: Path) -> Owner | None:
    from worker_role.vm.paths import read_dir_owner

    raw = read_dir_owner(d)
    if raw is None:
        return None
    pid, started = raw.get("pid"), raw.get("started")
    if isinstance(pid, int) and isinstance(started, float | int):
        return Owner(pid=pid, started=float(started))
    return None
