"""A real VM runs a command: output live, exit code, /out, layers, caps of scratch and network,
time limit, and guest failures that end as errors with console lines, never as hangs."""

from __future__ import annotations

import io
import os
import pty
import sys
import tarfile

import pytest
import trio

from catalog.caps import Caps
from tests.vm.conftest import VmFactory, collect
from worker_role.errors import GuestFailedError, GuestTimeoutError
from worker_role.vm import GuestCommand, Layer
from worker_role.vm.backend import OUTPUT_TAIL_BYTES, TASK_GRACE_S, OutputChunk

pytestmark = pytest.mark.vm

SCRIPT = r"""
echo "cwd=$(pwd) greeting=$GREETING"
echo "to stderr" >&2
cat /layer/hello.txt /lower/e.txt /etc/motd
echo overwritten > /etc/motd && cat /etc/motd
echo "net: $(ls /sys/class/net | tr '\n' ' ')"
dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/dev/null; echo "fill=$?"; rm /tmp/fill
mkdir -p /out/sub && echo result > /out/sub/r.txt && printf 'x%.0s' $(seq 100) > /out/x
exit 7
"""


async def test_run_streams_output_and_returns_code_files_layers(
    vms: VmFactory, squashfs_layer: Layer, erofs_layer: Layer
) -> None:
    send, receive = trio.open_memory_channel[OutputChunk](16)
    streamed = {"stdout": bytearray(), "stderr": bytearray()}
    task = GuestCommand(
        argv=("sh", "-c", SCRIPT), env={"GREETING": "hi there"}, cwd="/work", timeout_s=60
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, receive, streamed)
        async with send:
            result = await vms.run(
                task, Caps(disk_mib=32), layers=(squashfs_layer, erofs_layer), output=send
            )

    assert result.exit_code == 7
    assert not result.timed_out
    out = result.stdout.decode()
    assert "cwd=/work greeting=hi there\n" in out
    # Both layers read, the top one (squashfs) shadows the lower (erofs), the overlay is writable.
    assert "hello from a layer\nhello from erofs\nlayer motd\noverwritten\n" in out
    assert "net: lo \n" in out  # network none: the guest has only loopback
    assert "fill=1\n" in out  # the 32 MiB scratch disk refuses 64 MiB
    assert result.stderr == b"to stderr\n"
    assert bytes(streamed["stdout"]) == result.stdout  # everything also came live
    assert bytes(streamed["stderr"]) == result.stderr
    assert result.out_tar is not None
    with tarfile.open(fileobj=io.BytesIO(result.out_tar)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert files == {"./sub/r.txt": b"result\n", "./x": b"x" * 100}


async def test_time_limit_kills_the_command_and_keeps_out(vms: VmFactory) -> None:
    task = GuestCommand(
        argv=("sh", "-c", "echo partial > /out/p; echo started; sleep 600 & sleep 600"),
        timeout_s=3,
    )
    result = await vms.run(task)
    assert (result.exit_code, result.timed_out) == (124, True)
    assert result.stdout == b"started\n"
    assert result.out_tar is not None
    with tarfile.open(fileobj=io.BytesIO(result.out_tar)) as tar:
        assert tar.extractfile("./p").read() == b"partial\n"  # type: ignore[union-attr]


async def test_kernel_panic_is_a_failure_with_console_lines(vms: VmFactory) -> None:
    task = GuestCommand(argv=("sh", "-c", "echo c > /proc/sysrq-trigger"), timeout_s=30)
    with pytest.raises(GuestFailedError) as info:
        await vms.run(task)
    assert not isinstance(info.value, GuestTimeoutError)
    tail = "\n".join(info.value.console_tail).lower()
    assert "sysrq" in tail or "panic" in tail


async def test_hung_guest_hits_the_host_deadline(vms: VmFactory) -> None:
    # Killing the guest init's watchdog makes the guest ignore its own time limit: the host counts
    # it from the task's start, not from the boot with its (here 120 s) allowance.
    vms.backend.boot_allowance_s = 120
    task = GuestCommand(argv=("sh", "-c", "killall -9 sleep; echo hung; sleep 600"), timeout_s=2)
    start = trio.current_time()
    with pytest.raises(GuestTimeoutError) as info:
        await vms.run(task)
    assert trio.current_time() - start < 2 + TASK_GRACE_S + 30  # 30: a slow TCG boot
    assert "vmlend-init: starting task" in info.value.console_tail


async def test_cli_streams_output_and_exits_124_on_timeout() -> None:
    cmd = [
        sys.executable,
        "-m",
        "worker_role.vm.cli",
        "vm",
        "run",
        "--memory",
        "128MiB",
        "--timeout",
        "3s",
        "--",
        "sh",
        "-c",
        "echo hi; echo err >&2; sleep 600",
    ]
    with trio.fail_after(120):
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 124
    assert proc.stdout == b"hi\n"
    assert b"err\n" in proc.stderr


async def test_large_output_arrives_whole_and_in_order(vms: VmFactory) -> None:
    send, receive = trio.open_memory_channel[OutputChunk](16)
    streamed = {"stdout": bytearray(), "stderr": bytearray()}
    task = GuestCommand(argv=("sh", "-c", "seq 1 200000; seq 1 1000 >&2"), timeout_s=120)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, receive, streamed)
        async with send:
            result = await vms.run(task, output=send)
    expected = "".join(f"{i}\n" for i in range(1, 200001)).encode()
    assert len(expected) > OUTPUT_TAIL_BYTES
    assert bytes(streamed["stdout"]) == expected  # nothing lost at power-off, no marker leaked
    assert result.stdout == expected[-OUTPUT_TAIL_BYTES:]
    assert bytes(streamed["stderr"]) == "".join(f"{i}\n" for i in range(1, 1001)).encode()


async def test_cli_a_guest_kernel_panic_exits_125_with_one_line_and_no_traceback() -> None:
    cmd = [sys.executable, "-m", "worker_role.vm.cli", "vm", "run", "--memory", "128MiB"]
    cmd += ["--timeout", "30s", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"]
    with trio.fail_after(120):
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 125
    assert b"Traceback" not in proc.stderr
    assert proc.stderr.startswith(b"vmlend vm run: ")


async def test_cli_on_a_terminal_shows_a_guests_escape_sequences_as_text() -> None:
    # The guest tries to clear the screen and retitle the window; a terminal must see text.
    script = r"printf 'a\033[2J\033]0;owned\007b\n'"
    cmd = [sys.executable, "-m", "worker_role.vm.cli", "vm", "run", "--memory", "128MiB"]
    cmd += ["--timeout", "30s", "--", "sh", "-c", script]
    main, child = pty.openpty()
    try:
        with trio.fail_after(120):
            proc = await trio.run_process(cmd, stdout=child, capture_stderr=True, check=False)
        os.close(child)
        child = -1
        shown = b""
        while chunk := _read_some(main):
            shown += chunk
    finally:
        os.close(main)
        if child != -1:
            os.close(child)
    assert proc.returncode == 0
    assert b"\x1b" not in shown
    assert b"a^[[2J^[]0;owned^Gb" in shown


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the terminal's other end is closed and drained
        return b""


async def test_an_out_larger_than_the_result_disk_is_reported_not_dropped(vms: VmFactory) -> None:
    vms.backend.out_mib = 1  # a 1 MiB result disk, for a 2 MiB /out
    task = GuestCommand(
        argv=("sh", "-c", "dd if=/dev/zero of=/out/big bs=1024 count=2048 2>/dev/null; echo ok"),
        timeout_s=30,
    )
    result = await vms.run(task)
    assert (result.exit_code, result.out_tar) == (0, None)
    assert result.stderr.endswith(
        b"vmlend: /out did not fit on the 1 MiB result disk and was not kept\n"
    )
