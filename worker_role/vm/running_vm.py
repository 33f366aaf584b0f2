"""A started VM as the agent sees it: its output pumped, its result awaited, its deadline kept.

``RunningVm`` lives inside ``VmBackend.start()`` (worker_role/vm/backend.py), which creates the
domain and destroys it; this module reads what the guest says: stdout and stderr through their
ports until the end marker, the console for the task's start, the result disk at the end.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from worker_role.egress_proxy import EgressProxy
from worker_role.errors import GuestFailedError, GuestTimeoutError, VmError
from worker_role.vm.interface import OutputChunk, VmResult
from worker_role.vm.task import END_MARKER_PREFIX, GuestCommand, GuestResult, read_result

if TYPE_CHECKING:
    from worker_role.vm.backend import VmBackend

OUTPUT_TAIL_BYTES = 1 << 20
CONSOLE_TAIL_LINES = 40
# After the domain stops, QEMU has closed the sockets; what is left to read is already buffered.
_DRAIN_SECONDS = 5.0
# What the guest's init prints on the console as it starts the task (worker_role/guest/init.sh).
TASK_STARTED = b"vmlend-init: starting task"
TASK_START_POLL_S = 0.25
# Past the time limit, counted from the task's start: for the guest to write its result.
TASK_GRACE_S = 10.0
_CONSOLE_READ = 64 * 1024
_CONSOLE_TAIL_BYTES = 64 * 1024


class RunningVm:
    """A started VM, valid inside ``VmBackend.start()``."""

    def __init__(
        self, backend: VmBackend, name: str, vm_dir: Path, task: GuestCommand, started: float
    ) -> None:
        self.name = name
        self.dir = vm_dir
        self.task = task
        self.started_at = started
        self.deadline = started + task.timeout_s + backend.boot_allowance_s
        self.stopped = backend.conn.watch(name)
        self.proxy: EgressProxy | None = None
        self._backend = backend
        self._tails = {"stdout": bytearray(), "stderr": bytearray()}
        self._readers_done = trio.Event()
        # The guest ends each output stream with this marker once the result is on its disk, so
        # the result is known without waiting ~1.3 s for libvirt to stop the domain.
        self.end_token = secrets.token_hex(16).encode()
        self.end_marker = END_MARKER_PREFIX + self.end_token
        self._ended: set[str] = set()
        self.guest_done = trio.Event()
        self.warm = False
        self.task_started = False
        """Whether the guest said on its console that it started the task (seen by ``wait``)."""
        """Whether the VM was restored from a warm snapshot rather than booted."""
        self.control: trio.SocketStream | None = None

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> list[str]:
        """The console's last ``lines`` lines, read from its last ``_CONSOLE_TAIL_BYTES`` only:
        the guest writes the console file, as much as it likes."""
        try:
            with self.console_log.open("rb") as f:
                f.seek(max(0, f.seek(0, 2) - _CONSOLE_TAIL_BYTES))
                text = f.read(_CONSOLE_TAIL_BYTES).decode(errors="replace")
        except OSError:
            return []
        return [line.rstrip("\r") for line in text.splitlines()[-lines:]]

    async def _count_from_the_task_start(self, limit: trio.CancelScope) -> None:
        await console_says(self.console_log, TASK_STARTED, TASK_START_POLL_S)
        self.task_started = True
        started = trio.current_time()
        limit.deadline = min(limit.deadline, started + self.task.timeout_s + TASK_GRACE_S)
        self.deadline = limit.deadline

    def qemu_pid(self) -> int:
        """The QEMU process's pid (libvirt's pid file), for measuring what the VM costs the host."""
        path = Path("/run/libvirt/qemu") / f"{self.name}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError) as e:
            raise VmError(f"no QEMU pid for {self.name} in {path}: {e}") from e

    async def wait(self) -> VmResult:
        """Wait for the guest to finish (up to its deadline) and read its result.

        Until the guest says on its console that the task started, the deadline allows for the
        boot; from then on the host counts the time limit itself (plus a little grace for the
        result), so a task that kills the guest's own watchdog gains nothing."""
        with trio.move_on_at(self.deadline) as limit:
            async with trio.open_nursery() as nursery:
                for event in (self.stopped, self.guest_done):
                    nursery.start_soon(_cancel_when_set, event, nursery.cancel_scope)
                nursery.start_soon(self._count_from_the_task_start, limit)
        if not (self.stopped.is_set() or self.guest_done.is_set()):
            tail = await trio.to_thread.run_sync(self.console_tail)
            await self.destroy()
            raise GuestTimeoutError(
                f"guest {self.name} gave no result within {self.deadline - self.started_at:.0f} s "
                f"(time limit {self.task.timeout_s} s, counted from the task's start once the "
                "guest started it, from the boot with an allowance before)",
                console_tail=tail,
            )
        if not self.guest_done.is_set():
            with trio.move_on_after(_DRAIN_SECONDS):
                await self._readers_done.wait()
        result = await trio.to_thread.run_sync(read_result, self.dir / "result.img")
        tail = await trio.to_thread.run_sync(self.console_tail)
        if result is None:
            raise GuestFailedError(f"guest {self.name} ended without a result", console_tail=tail)
        return self._result(result, tail)

    def _result(self, r: GuestResult, tail: list[str]) -> VmResult:
        stderr = bytes(self._tails["stderr"])
        if r.out_tar is None:
            # The guest could not write /out whole: say so where the owner looks, never drop it
            # silently (the note keeps stderr within what a worker may report).
            note = (
                f"\nvmlend: /out did not fit on the {self._backend.out_mib} MiB result disk "
                "and was not kept\n"
            ).encode()
            stderr = stderr[max(0, len(stderr) + len(note) - OUTPUT_TAIL_BYTES) :] + note
        return VmResult(
            exit_code=r.exit_code,
            timed_out=r.timed_out,
            stdout=bytes(self._tails["stdout"]),
            stderr=stderr,
            out_tar=r.out_tar,
            console_tail=tuple(tail),
            elapsed_s=trio.current_time() - self.started_at,
            egress=self.proxy.statistics() if self.proxy else None,
            warm=self.warm,
        )

    async def destroy(self) -> None:
        """Stop the guest now (idempotent)."""
        await self._backend._destroy(self.name)

    async def _pump(
        self, stream: str, path: Path, output: trio.MemorySendChannel[OutputChunk] | None
    ) -> None:
        tail = self._tails[stream]
        pending = bytearray()

        async def emit(data: bytes) -> None:
            nonlocal output
            if not data:
                return
            tail.extend(data)
            del tail[:-OUTPUT_TAIL_BYTES]
            if output is not None:
                try:
                    await output.send((stream, data))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    output = None  # the consumer left; keep collecting the tail

        try:
            sock = await trio.open_unix_socket(str(path))
        except OSError as e:
            # A guest that wrote nothing can power off before we connect (its writes would block
            # until we do): then QEMU and its socket are gone, and there is simply no output.
            if await self._backend._is_gone(self.name):
                return
            raise VmError(f"cannot connect to the guest's {stream} at {path}: {e}") from e
        async with sock:
            while True:
                try:
                    data = await sock.receive_some(65536)
                except trio.BrokenResourceError:
                    break  # QEMU went away: the domain ended
                if not data:
                    break
                pending += data
                end = pending.find(self.end_marker)
                if end >= 0:
                    await emit(bytes(pending[:end]))
                    self._ended.add(stream)
                    if self._ended == {"stdout", "stderr"}:
                        self.guest_done.set()
                    return
                # Hold back only a tail that could be the start of a marker split across reads;
                # the marker starts with NUL ESC, so live text output is never held.
                cut = len(pending) - _marker_prefix_at_end(pending, self.end_marker)
                await emit(bytes(pending[:cut]))
                del pending[:cut]
        await emit(bytes(pending))


def _marker_prefix_at_end(data: bytearray, marker: bytes) -> int:
    """The length of the longest tail of ``data`` that is a proper prefix of ``marker``."""
    start = data.find(marker[:1], max(0, len(data) - len(marker) + 1))
    while start >= 0:
        if marker.startswith(data[start:]):
            return len(data) - start
        start = data.find(marker[:1], start + 1)
    return 0


async def console_says(console: Path, marker: bytes, poll_s: float) -> None:
    """Return once the console log holds ``marker`` (looked for every ``poll_s``)."""
    seen = b""
    offset = 0
    while marker not in seen:
        await trio.sleep(poll_s)
        more = await trio.to_thread.run_sync(_read_from, console, offset)
        offset += len(more)
        seen = seen[-len(marker) :] + more  # the marker may straddle two reads


def _read_from(path: Path, offset: int) -> bytes:
    """At most ``_CONSOLE_READ`` bytes of ``path`` from ``offset`` (none yet if it is missing)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(_CONSOLE_READ)
    except FileNotFoundError:
        return b""


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
