"""A worker whose libvirt connection was closed under it heals (issue 15, item 2).

libvirtd drops a client that misses its keepalives (the worker frozen ~30 s). `virt-admin
client-disconnect` does the same to exactly our connection, on the real daemon.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
import trio

from worker_role.errors import VmError, VmSetupError
from worker_role.vm.conn import Connection, open_connection

pytestmark = pytest.mark.vm

# A guest with no disk: SeaBIOS finds nothing to boot and waits; enough to have a domain to watch.
_IDLE_GUEST = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


def _virt_admin(*args: str) -> str:
    return subprocess.run(
        ["virt-admin", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def _disconnect_this_process() -> int:
    """Make libvirtd close every connection this process has to it; return how many."""
    closed = 0
    for line in _virt_admin("srv-clients-list", "libvirtd").splitlines()[2:]:
        if not line.strip():
            continue
        client = line.split()[0]
        info = _virt_admin("client-info", "libvirtd", client)
        if f"unix_process_id: {os.getpid()}" in info:
            _virt_admin("client-disconnect", "libvirtd", client)
            closed += 1
    return closed


def _names(raw: object) -> list[str]:
    return [d.name() for d in raw.listAllDomains(0)]  # type: ignore[attr-defined]


async def _disconnect(conn: Connection) -> None:
    assert await trio.to_thread.run_sync(_disconnect_this_process) >= 1


async def test_calls_work_again_after_libvirtd_closed_the_connection() -> None:
    async with open_connection() as conn:
        await conn.call("list domains", _names, conn.raw)
        before = conn.raw
        await _disconnect(conn)
        # Before: every later call failed with "client socket is closed", for good.
        with trio.fail_after(30):
            names = await conn.call("list domains", _names, conn.raw)
        assert isinstance(names, list)
        assert conn.raw is not before
        assert conn.reconnects == 1
        assert conn.problem is None


async def test_a_domain_that_stopped_while_disconnected_is_reported_stopped() -> None:
    name = f"vmlend-test-reconnect-{uuid.uuid4().hex[:8]}"
    async with open_connection() as conn:
        dom = await conn.call("start", conn.raw.createXML, _IDLE_GUEST.format(name=name), 0)
        try:
            stopped = conn.watch(name)
            await _disconnect(conn)
            # Stopped by someone else while our connection (and its events) were gone.
            await trio.to_thread.run_sync(
                lambda: subprocess.run(["virsh", "destroy", name], capture_output=True, check=True)
            )
            assert not stopped.is_set()
            with trio.fail_after(30):
                await conn.ensure_open()
                await stopped.wait()
        finally:
            await trio.to_thread.run_sync(
                lambda: subprocess.run(["virsh", "destroy", name], capture_output=True)
            )
            del dom


async def test_an_unreachable_libvirtd_is_a_setup_error_with_a_problem_named() -> None:
    async with open_connection() as conn:
        conn.uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
        await _disconnect(conn)
        errors: list[VmError] = []
        with trio.fail_after(30):
            while not (errors and isinstance(errors[-1], VmSetupError)):
                try:
                    await conn.call("list domains", _names, conn.raw)
                except VmError as e:  # first maybe "lost", then the reconnect's own error
                    errors.append(e)
        assert "is libvirtd running" in str(errors[-1])
        assert conn.problem is not None
        assert "cannot connect to libvirt" in conn.problem
