"""``vmlend vm run`` mistakes through the real binary (issue 18, item 2): one line, never QEMU's
report. Before, ``--memory 99TB`` started QEMU and ended in ~60 lines (later one long libvirt
line) about "Cannot allocate memory"."""

from __future__ import annotations

import pytest
import trio

from node.localnet import vmlend_command
from worker_role.errors import VmError
from worker_role.vm.cli import host_memory_mib, vm_error_line


@pytest.mark.e2e
async def test_memory_beyond_the_hosts_ram_is_refused_before_qemu_starts() -> None:
    start = trio.current_time()
    with trio.fail_after(60):
        done = await trio.run_process(
            [*vmlend_command(), "vm", "run", "--memory", "99TB", "--", "true"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.count("\n") == 1, err
    assert "vmlend vm run: --memory 90 TiB is more than this machine's " in err
    assert "of RAM; ask for less" in err
    assert "qemu" not in err.lower()
    # No VM was tried: QEMU alone takes longer than the whole refusal.
    assert trio.current_time() - start < 20
    assert host_memory_mib() > 0


def test_a_qemu_start_failure_is_qemus_reason_in_one_line() -> None:
    # As libvirt reported it here for --memory 99TB before the RAM check.
    seen = VmError(
        "create vmlend-dcbefea47ac7: internal error: process exited while connecting to monitor:"
        " 2026-12-07T05:24:27.113285Z qemu-system-x86_64: cannot set up guest memory 'pc.ram':"
        " Cannot allocate memory"
    )
    assert vm_error_line(seen) == (
        "the VM did not start: QEMU: cannot set up guest memory 'pc.ram': Cannot allocate memory"
    )
    assert vm_error_line(VmError("guest kernel panic:\n  at boot")) == (
        "guest kernel panic: at boot"
    )
