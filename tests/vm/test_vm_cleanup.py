"""A worker that dies holding a VM leaves nothing behind once a backend starts again."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import psutil
import pytest
import trio

from worker_role.vm import open_backend
from worker_role.vm.paths import default_runtime_dir

pytestmark = pytest.mark.vm

HOLDER = textwrap.dedent(
    """
    import trio
    from catalog.caps import Caps
    from worker_role.vm import Image, GuestCommand, open_backend

    async def main():
        async with open_backend() as backend:
            task = GuestCommand(argv=("sleep", "600"), timeout_s=600)
            async with backend.start(Image.tiny(), task, Caps(memory_mib=64)) as vm:
                print(vm.name, vm.qemu_pid(), flush=True)
                await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_killed_owner_leaves_nothing_after_restart() -> None:
    async with trio.open_nursery() as nursery:
        holder = functools.partial(
            trio.run_process, [sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, check=False
        )
        proc = await nursery.start(holder)
        line = b""
        with trio.fail_after(90):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(100)
                assert chunk, "holder exited before starting its VM"
                line += chunk
        name, qemu_pid = line.decode().split()
        vm_dir = default_runtime_dir() / name
        assert vm_dir.is_dir()
        qemu = psutil.Process(int(qemu_pid))
        assert qemu.is_running()
        proc.kill()  # SIGKILL: no cleanup code of the holder runs

    async with open_backend() as backend:
        assert name not in await backend.our_domains()
        assert not vm_dir.exists()
        # The domain is gone, so its QEMU is (or is about to be) gone too.
        await trio.to_thread.run_sync(qemu.wait, 30)
