"""``vmlend vm run``: run a command in a capped tiny VM on this machine, as a lender's self-check.

:func:`add_vm_arguments` fills the ``vm`` command's parser (``node.cli`` calls it only when that
command runs). The exit code is the guest command's, 124 when it hit its time limit, 125 when the
VM itself failed or was refused.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from catalog.caps import MIB, Caps, NetworkMode
from node.cli_common import (
    EXIT_GUEST_TIMEOUT,
    EXIT_USAGE,
    EXIT_VM_FAILED,
    command_after_dashes,
    run_command,
)
from node.supervise import one_error
from node.terminal import RAW_HELP, OutputWriter
from node.units import human_size, parse_duration, parse_rate, parse_size
from worker_role.errors import GuestTimeoutError, VmError
from worker_role.vm.backend import Image, OutputChunk, open_backend
from worker_role.vm.task import GuestCommand


def add_vm_arguments(vm: argparse.ArgumentParser) -> None:
    """Add ``run`` to the ``vm`` command's parser; it sets ``handler(args) -> int``."""
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    run = vm_sub.add_parser(
        "run",
        help="run CMD in a capped tiny VM; exit with its exit code (124 on timeout)",
        description="Everything after -- is the command, run in the guest's busybox root.",
    )
    run.add_argument("--raw", action="store_true", help=RAW_HELP)
    run.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    run.add_argument(
        "--cpu-share",
        type=float,
        default=None,
        help="host CPUs the whole VM may use, e.g. 0.5 (default: --cpus)",
    )
    run.add_argument("--memory", type=_mib, default=256, help="guest memory (default 256MiB)")
    run.add_argument("--disk", type=_mib, default=256, help="scratch disk size (default 256MiB)")
    run.add_argument(
        "--disk-bps",
        type=parse_rate,
        default=0,
        help="disk bytes/s, e.g. 10MiB/s (default unlimited)",
    )
    run.add_argument("--disk-iops", type=int, default=0, help="disk IOPS (default unlimited)")
    run.add_argument(
        "--network",
        choices=[m.value for m in NetworkMode],
        default="none",
        help="none (only lo) or proxy (HTTP proxy with --allow and --net-bps)",
    )
    run.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="destination the proxy lets through (repeatable); '*' is any public one, while an "
        "internal one (127.0.0.1, the LAN, this host's addresses) must be named exactly",
    )
    run.add_argument("--net-bps", type=parse_rate, default=0, help="proxy rate cap")
    run.add_argument(
        "--timeout",
        type=parse_duration,
        default=60.0,
        help="time limit of the command, e.g. 30s or 5m (default 60s)",
    )
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--cwd", default="/", help="working directory in the guest")
    run.add_argument(
        "--vm-dir",
        type=Path,
        default=None,
        help="VM runtime directory (default /var/lib/vmlend/vm)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    run.set_defaults(handler=cmd_vm_run)


def _mib(text: str) -> int:
    return max(1, math.ceil(parse_size(text) / MIB))


def cmd_vm_run(args: argparse.Namespace) -> int:
    argv = command_after_dashes(args.argv)
    if not argv:
        print("vmlend vm run: no command (give it after --)", file=sys.stderr)
        return EXIT_USAGE
    try:
        env = dict(item.split("=", 1) for item in args.env)
        caps = Caps(
            vcpus=args.cpus,
            cpu_share=args.cpu_share if args.cpu_share is not None else float(args.cpus),
            memory_mib=args.memory,
            disk_mib=args.disk,
            disk_bps=args.disk_bps,
            disk_iops=args.disk_iops,
            network=NetworkMode(args.network),
            net_bps=args.net_bps,
            net_allow=tuple(args.allow),
        )
        task = GuestCommand(
            argv=tuple(argv), env=env, cwd=args.cwd, timeout_s=max(1, math.ceil(args.timeout))
        )
    except ValueError as e:
        print(f"vmlend vm run: {e}", file=sys.stderr)
        return EXIT_USAGE
    host = host_memory_mib()
    if caps.memory_mib > host:
        # QEMU would fail only after a long error report; say it before starting it.
        print(
            f"vmlend vm run: --memory {human_size(caps.memory_mib * MIB)} is more than this "
            f"machine's {human_size(host * MIB)} of RAM; ask for less",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return trio.run(partial(vm_run, task, caps, args.vm_dir, raw=args.raw))


def host_memory_mib() -> int:
    """This machine's RAM in MiB (no guest can be given more)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB


def vm_error_line(e: VmError) -> str:
    """The error as one line; a QEMU start failure as QEMU's own reason (libvirt wraps it in
    its monitor message and a timestamp)."""
    text = " ".join(str(e).split())
    _, qemu, reason = text.rpartition("qemu-system-")
    if qemu and ": " in reason:
        return f"the VM did not start: QEMU: {reason.split(': ', 1)[1]}"
    return text


async def vm_run(
    task: GuestCommand, caps: Caps, vm_dir: Path | None = None, *, raw: bool = False
) -> int:
    """Run ``task`` under ``caps``, streaming its output to our stdout/stderr (made safe for a
    terminal unless ``raw``); the exit code: the guest's, 124 on its timeout, 125 when the VM
    failed (a kernel panic, say) or was refused."""
    send, receive = trio.open_memory_channel[OutputChunk](64)
    try:
        # one_error: the nursery groups even a lone error, which would escape the excepts below.
        async with (
            one_error(),
            open_backend(runtime_dir=vm_dir) as backend,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_print_output, receive, OutputWriter(raw=raw))
            async with send:
                result = await backend.run(Image.tiny(), task, caps, output=send)
        if result.out_tar is None:
            print("vmlend vm run: /out did not fit on the result disk; not kept", file=sys.stderr)
        return result.exit_code
    except GuestTimeoutError as e:
        print(f"vmlend vm run: {e}", file=sys.stderr)
        return EXIT_GUEST_TIMEOUT
    except VmError as e:
        print(f"vmlend vm run: {vm_error_line(e)}", file=sys.stderr)
        return EXIT_VM_FAILED


async def _print_output(
    receive: trio.MemoryReceiveChannel[OutputChunk], output: OutputWriter
) -> None:
    async with receive:
        async for stream, data in receive:
            output.write(stream, data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker_role.vm.cli")
    commands = parser.add_subparsers(dest="command", required=True)
    add_vm_arguments(commands.add_parser("vm"))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
