"""The one place libvirt is called: a connection whose blocking calls run in worker threads,
errors translated to ours, and domain lifecycle events delivered into trio."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import libvirt
import trio

from worker_role.errors import VmError, VmSetupError

log = logging.getLogger("vmlend.worker.vm")
T = TypeVar("T")
DEFAULT_URI = "qemu:///system"


class _EventLoop:
    """libvirt's default event loop, which is process-wide by libvirt's design: registered once,
    before the first connection, and run forever by one daemon thread."""

    _lock = threading.Lock()
    _started = False

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            libvirt.virEventRegisterDefaultImpl()
            # libvirt prints every error to stderr by default; ours are raised and translated.
            libvirt.registerErrorHandler(_ignore_error, None)
            threading.Thread(target=cls._run, name="libvirt-events", daemon=True).start()
            cls._started = True

    @staticmethod
    def _run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


def _ignore_error(_ctx: Any, _err: Any) -> None:
    pass


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """libvirt's exceptions become :class:`VmError` here, at the boundary."""
    try:
        yield
    except libvirt.libvirtError as e:
        raise VmError(f"{what}: {e.get_error_message() or e}") from e


class Connection:
    """A libvirt connection for trio code that heals. ``call`` runs a blocking function in a
    thread.

    ``watch(name)`` gives a :class:`trio.Event` set when that domain stops, fed by libvirt's
    lifecycle events (delivered from libvirt's thread by ``run_sync_soon``, which never blocks).

    libvirtd closes a client that misses its keepalives (a worker frozen for ~30 s) and then
    every call failed with "client socket is closed" for the rest of the process. Now the close
    is noticed (libvirt's close callback, ``isAlive``, or a call failing on a dead connection)
    and the next call reopens the connection first: lifecycle events are registered again and
    every watched domain that stopped meanwhile (its event was lost with the connection) is
    reported stopped. ``problem`` says why VMs cannot run while libvirtd cannot be reached.
    Callers may pass :attr:`raw` and its bound methods: a connection that was replaced is
    swapped for the new one.
    """

    def __init__(self, uri: str, token: trio.lowlevel.TrioToken) -> None:
        self.uri = uri
        self.raw: Any = None
        self.reconnects = 0
        self.problem: str | None = None
        self._token = token
        self._stopped: dict[str, trio.Event] = {}
        self._callback_id: int | None = None
        self._lost: str | None = None  # set from libvirt's thread by the close callback
        self._lock = trio.Lock()

    async def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        stale = self.raw
        await self.ensure_open()
        if stale is not None and stale is not self.raw:
            if getattr(fn, "__self__", None) is stale:
                fn = getattr(self.raw, fn.__name__)
            args = tuple(self.raw if arg is stale else arg for arg in args)

        def run() -> T:
            with translated(what):
                return fn(*args)

        try:
            return await trio.to_thread.run_sync(run)
        except VmError:
            if self._lost is None and not await trio.to_thread.run_sync(self._alive):
                self._lost = "a call failed on a closed connection"
            if self._lost is not None:
                raise VmError(
                    f"{what}: the connection to libvirtd was lost ({self._lost})"
                ) from None
            raise

    async def ensure_open(self) -> None:
        """Reopen the connection if it was lost (VmSetupError if libvirtd cannot be reached)."""
        if self.raw is not None and self._lost is None:
            return
        async with self._lock:
            if self.raw is not None and self._lost is None:
                return
            reason = self._lost
            if self.raw is not None:
                await trio.to_thread.run_sync(_close, self.raw, self._callback_id)
                self.raw, self._callback_id = None, None
            try:
                await self._open()
            except VmSetupError as e:
                self.problem = str(e)
                raise
            self.problem, self._lost = None, None
            if reason is not None:
                self.reconnects += 1
                log.warning("libvirt connection lost (%s); reconnected to %s", reason, self.uri)
                await self._report_stopped_while_away()

    async def close(self) -> None:
        if self.raw is not None:
            await trio.to_thread.run_sync(_close, self.raw, self._callback_id)
            self.raw, self._callback_id = None, None

    def watch(self, name: str) -> trio.Event:
        event = self._stopped.setdefault(name, trio.Event())
        return event

    def unwatch(self, name: str) -> None:
        self._stopped.pop(name, None)

    async def _open(self) -> None:
        def connect() -> Any:
            try:
                return libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise VmSetupError(
                    f"cannot connect to libvirt at {self.uri} (is libvirtd running?): {e}"
                ) from e

        def register(raw: Any) -> int:
            with translated("register lifecycle events"):
                raw.registerCloseCallback(self._on_close, None)
                callback: int = raw.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
                return callback

        raw = await trio.to_thread.run_sync(connect)
        try:
            self._callback_id = await trio.to_thread.run_sync(register, raw)
        except VmError as e:
            await trio.to_thread.run_sync(_close, raw, None)
            raise VmSetupError(str(e)) from e
        self.raw = raw

    def _alive(self) -> bool:
        try:
            return self.raw is not None and self.raw.isAlive() == 1
        except libvirt.libvirtError:
            return False

    async def _report_stopped_while_away(self) -> None:
        def stopped(names: list[str]) -> list[str]:
            gone = []
            for name in names:
                try:
                    if not self.raw.lookupByName(name).isActive():
                        gone.append(name)
                except libvirt.libvirtError:  # no such domain any more
                    gone.append(name)
            return gone

        for name in await trio.to_thread.run_sync(stopped, list(self._stopped)):
            self._stopped_in_trio(name)

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        # Runs in libvirt's event thread; a plain assignment, read by trio code.
        self._lost = _CLOSE_REASONS.get(reason, f"closed, reason {reason}")

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        # Runs in libvirt's event thread.
        if event != libvirt.VIR_DOMAIN_EVENT_STOPPED:
            return
        name = dom.name()
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._stopped_in_trio, name)

    def _stopped_in_trio(self, name: str) -> None:
        event = self._stopped.get(name)
        if event is not None:
            event.set()


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "a socket error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed it",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timed out",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us",
}


@contextlib.asynccontextmanager
async def open_connection(uri: str = DEFAULT_URI) -> AsyncIterator[Connection]:
    _EventLoop.ensure()
    conn = Connection(uri, trio.lowlevel.current_trio_token())
    await conn.ensure_open()
    try:
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            await conn.close()


def _close(raw: Any, callback_id: int | None) -> None:
    try:
        if callback_id is not None:
            raw.domainEventDeregisterAny(callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            raw.unregisterCloseCallback()
        raw.close()
    except libvirt.libvirtError as e:
        # Closing can only fail if libvirtd went away; nothing is left to release then.
        log.debug("closing libvirt connection: %s", e)
