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
    """A libvirt connection for trio code. ``call`` runs a blocking function in a thread.

    ``watch(name)`` gives a :class:`trio.Event` set when that domain stops, fed by libvirt's
    lifecycle events (delivered from libvirt's thread by ``run_sync_soon``, which never blocks).
    """

    def __init__(self, raw: Any, token: trio.lowlevel.TrioToken) -> None:
        self.raw = raw
        self._token = token
        self._stopped: dict[str, trio.Event] = {}
        self._callback_id: int | None = None

    async def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        def run() -> T:
            with translated(what):
                return fn(*args)

        return await trio.to_thread.run_sync(run)

    def watch(self, name: str) -> trio.Event:
        event = self._stopped.setdefault(name, trio.Event())
        return event

    def unwatch(self, name: str) -> None:
        self._stopped.pop(name, None)

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


@contextlib.asynccontextmanager
async def open_connection(uri: str = DEFAULT_URI) -> AsyncIterator[Connection]:
    _EventLoop.ensure()

    def connect() -> Any:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise VmSetupError(
                f"cannot connect to libvirt at {uri} (is libvirtd running?): {e}"
            ) from e

    raw = await trio.to_thread.run_sync(connect)
    conn = Connection(raw, trio.lowlevel.current_trio_token())
    try:
        conn._callback_id = await conn.call(
            "register lifecycle events",
            raw.domainEventRegisterAny,
            None,
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            conn._on_lifecycle,
            None,
        )
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close, raw, conn._callback_id)


def _close(raw: Any, callback_id: int | None) -> None:
    try:
        if callback_id is not None:
            raw.domainEventDeregisterAny(callback_id)
        raw.close()
    except libvirt.libvirtError as e:
        # Closing can only fail if libvirtd went away; nothing is left to release then.
        log.warning("closing libvirt connection: %s", e)
