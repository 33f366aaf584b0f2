"""The scheduler role on the network: the queue behind ``/vmlend/dispatch/2.0.0`` and the owners'
``/vmlend/tasks/1.0.0`` (:mod:`scheduler_role.owner_api`), plus ``/vmlend/tasklogs/1.0.0``.

Thin trio glue around the sans-IO parts: each dispatch request is decoded with
:func:`catalog.dispatch.decode_request` and answered by :func:`dispatch.handle` under the
request's ID; stop notices (from a result, a cancel, an expired lease or a tick) are pushed as
:class:`catalog.dispatch.Stop` on the worker's own control stream (the worker also learns them
from its next heartbeat ack). Before a result is counted its blobs (stdout, stderr, the ``/out``
archive) are fetched from the worker's chunk store into ours, so results stay here until the
owner has them, whatever happens to the worker.

Log frames (``/vmlend/tasklogs/1.0.0``, worker -> scheduler) are
:class:`catalog.dispatch.LogChunk`.

Logs are kept in memory for owners following them (:class:`LogBuffer`); after a restart the
result's stdout/stderr stand in for them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import blake3
import trio

from catalog.blob import BlobId
from catalog.blob_fetch import discard_blob, fetch_for_peer, read_small
from catalog.blob_service import BlobService
from catalog.build.assemble import Assembler
from catalog.build.cache import BuildCache
from catalog.build.os_tiny import BootFiles
from catalog.build.publish import publish_os
from catalog.dispatch import (
    LOGS,
    LOGS_PROTOCOL_ID,
    LOGS_WIRE_LIMITS,
    MAX_RESULT_ARCHIVE,
    MAX_RESULT_OUTPUT,
    MAX_WORK_HOLD,
    PROTOCOL_ID,
    WIRE_LIMITS,
    Request,
    ResultAck,
    ResultReport,
    ResultStatus,
    WorkRequest,
    decode_request,
    encode_answer,
    encode_stop,
)
from catalog.errors import BlobTooLargeError, CatalogError, UnknownEntryError
from catalog.library import Library
from catalog.manifest import ImageManifest
from catalog.owner_protocol import PROTOCOL_ID as TASKS_PROTOCOL_ID
from catalog.owner_protocol import WIRE_LIMITS as TASKS_WIRE_LIMITS
from catalog.peer_quota import PeerQuotaError
from catalog.taskfile import TaskFile
from node import dht_records
from node.contained import contained
from node.errors import NetworkError, RemoteProtocolError, StoreError, StreamBrokenError
from node.p2p import P2PNode
from node.p2p_stream import MessageStream
from node.supervise import one_error, run_contained
from scheduler_role import dispatch
from scheduler_role.errors import UnknownTaskError
from scheduler_role.lifecycle import TaskState
from scheduler_role.live_logs import MAX_LEASE_LOG, LogBuffer
from scheduler_role.queue import Queue, StopNotice
from scheduler_role.ready_image import ready_manifest
from scheduler_role.retention import DEFAULT_KEEP_FINISHED, Retention
from scheduler_role.task_store import load_task
from scheduler_role.trust import Policy

log = logging.getLogger("vmlend.scheduler.service")

MAX_LOG_TASKS = 64  # live logs kept at once: with MAX_LOG_BYTES each, 64 MiB at most
FETCH_TIMEOUT = 60.0
TASKS_DIR = "tasks"


def _result_blobs(report: ResultReport) -> list[BlobId]:
    blobs = [report.stdout_blob, report.stderr_blob]
    if report.archive_blob is not None:
        blobs.append(report.archive_blob)
    return [BlobId(blob) for blob in dict.fromkeys(blobs)]


def public_key_of(peer_id: str) -> bytes:
    """The raw Ed25519 key inside a peer ID; RemoteProtocolError if none."""
    try:
        return dht_records.public_key_of(peer_id)
    except ValueError as e:
        raise RemoteProtocolError(str(e)) from e


class SchedulerService:
    """One scheduler: queue, dispatch, logs, image assembly. Start with ``nursery.start(run)``."""

    def __init__(
        self,
        p2p: P2PNode,
        blobs: BlobService,
        data_dir: Path,
        *,
        boot: Callable[[], BootFiles],
        lease_timeout: float = 30.0,
        build_cache: Path | None = None,
        library: Library | None = None,
        policy: Policy | None = None,
        keep_finished: float = DEFAULT_KEEP_FINISHED,
    ) -> None:
        self.p2p = p2p
        self._policy = policy or Policy()
        self.blobs = blobs
        self.data_dir = data_dir
        self._boot = boot
        self._lease_timeout = lease_timeout
        self._build_cache = build_cache
        self._library = library
        self.keep_finished = keep_finished
        self._workers: dict[str, MessageStream] = {}
        self._holding: set[str] = set()  # workers whose work request is held now
        self._published_oses: set[str] = set()  # in the OS library since this run began
        self.logs: dict[str, LogBuffer] = {}
        self._changed = trio.Event()
        self._assembly_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.queue: Queue
        self.retention: Retention

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from scheduler_role.owner_api import OwnerApi

        await trio.Path(self.data_dir / TASKS_DIR).mkdir(parents=True, exist_ok=True)
        async with (
            Queue.open(
                self.data_dir / "scheduler.db",
                lease_timeout=self._lease_timeout,
                retry_after=1.0,
                policy=self._policy,
            ) as queue,
            trio.open_nursery() as nursery,
        ):
            self.queue = queue
            self._nursery = nursery
            await nursery.start(queue.serve_ticks, self._after_tick)
            self.retention = Retention(
                queue, self.blobs, self.data_dir / TASKS_DIR, keep_finished=self.keep_finished,
                on_forgotten=self._forgotten,
            )  # fmt: skip
            await nursery.start(self.retention.serve)
            for status in await queue.waiting():
                if status.state in (TaskState.SUBMITTED, TaskState.ASSEMBLING):
                    nursery.start_soon(self.assemble, status.spec.task_id)
            self.p2p.set_handler(PROTOCOL_ID, self._serve_dispatch, limits=WIRE_LIMITS)
            self.p2p.set_handler(LOGS_PROTOCOL_ID, self._serve_logs, limits=LOGS_WIRE_LIMITS)
            self.p2p.set_handler(TASKS_PROTOCOL_ID, OwnerApi(self).serve, limits=TASKS_WIRE_LIMITS)
            log.info("scheduler %s serving", self.p2p.peer_id)
            # The OS library lists what this scheduler builds without a network: the tiny OS.
            nursery.start_soon(self._publish_os_contained, "tiny")
            task_status.started()

    # ---- changes -------------------------------------------------------------------------

    @property
    def connected_workers(self) -> frozenset[str]:
        """Workers with a control stream open to us now."""
        return frozenset(self._workers)

    @property
    def held_requests(self) -> frozenset[str]:
        """Workers whose work request waits here for work now."""
        return frozenset(self._holding)

    def changed(self) -> None:
        """Wake whoever waits for a task's state to move (owners' wait, logs)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, timeout: float) -> None:  # noqa: ASYNC109
        """Until the next change, or ``timeout`` s (tick-driven changes do not always signal)."""
        with trio.move_on_after(timeout):
            await self._changed.wait()

    def _forgotten(self, task_id: str) -> None:
        self.logs.pop(task_id, None)
        self.changed()

    async def _after_tick(self, stops: list[StopNotice]) -> None:
        await self.push_stops(stops)
        self.changed()

    async def push_stops(self, stops: Sequence[StopNotice]) -> None:
        for worker, messages in dispatch.stop_messages(stops).items():
            stream = self._workers.get(worker)
            if stream is None:
                continue  # it learns from its next heartbeat's ack
            for message in messages:
                try:
                    await stream.send(encode_stop(message))
                except NetworkError as e:
                    log.info("stop to %s not delivered (%s); heartbeats tell it", worker, e)

    # ---- image assembly ------------------------------------------------------------------

    def task_dir(self, task_id: str) -> Path:
        return contained(self.data_dir / TASKS_DIR, task_id)

    def start_assembly(self, task_id: str) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._assemble_contained, task_id)

    async def _assemble_contained(self, task_id: str) -> None:
        """An assembly runs in the service's nursery: a bug in it fails that task, not the node.
        One cut short because the scheduler is stopping is no bug: the queue it would write to
        is closing, and the assembly starts again when the scheduler does."""

        async def assemble_unless_stopping() -> None:
            try:
                await self.assemble(task_id)
            except StoreError:
                if trio.current_effective_deadline() != -math.inf:
                    raise
                log.info("assembling %s: stopped with the scheduler", task_id)

        if not await run_contained(log, f"assembling {task_id}", assemble_unless_stopping):
            failed = partial(self.queue.assembly_failed, task_id, "internal error in assembly")
            await run_contained(log, f"failing {task_id}", failed)
            self.changed()

    async def assemble(self, task_id: str) -> None:
        """Build the task's image from its stored task file; the queue learns either way."""
        async with self._assembly_lock:
            try:
                status = await self.queue.status(task_id)
            except UnknownTaskError:
                return  # finished and forgotten before its assembly began
            if status.state is TaskState.SUBMITTED:
                await self.queue.begin_assembly(task_id)
            elif status.state is not TaskState.ASSEMBLING:
                return
            try:
                task = await trio.to_thread.run_sync(load_task, self.task_dir(task_id))
                manifest_blob, m = await self._image_of(task_id, task)
            except (CatalogError, OSError, trio.TooSlowError) as e:
                log.info("assembling %s failed: %s", task_id, e)
                await self.queue.assembly_failed(task_id, f"image assembly failed: {e}"[:500])
                self.changed()
                return
            for blob in (m.kernel, m.initramfs, *(x.blob for x in m.layers)):
                self.blobs.announce(BlobId(bytes.fromhex(blob)))
            self.blobs.announce(manifest_blob)
            await self.queue.image_ready(task_id, bytes(manifest_blob))
            log.info("task %s: image %s ready", task_id, m.id)
            self.changed()
            if not task.image and task.os not in self._published_oses:
                # Its OS is built now: into the OS library (once: hashing its files again for
                # every task would be work for nothing).
                assert self._nursery is not None
                self._nursery.start_soon(self._publish_os_contained, task.os)

    async def _publish_os_contained(self, name: str) -> None:
        """Sign ``name``'s entry into the OS library (a failure is logged: tasks build it anyway
        when they ask for it)."""
        if self._library is None or name in self._published_oses:
            return
        self._published_oses.add(name)
        library = self._library

        async def publish() -> None:
            assembler = Assembler(BuildCache(self._build_cache), self.blobs.blobs, self._boot())
            try:
                async with self._assembly_lock:
                    entry = await publish_os(
                        assembler, name, identity=self.p2p.identity, library=library,
                        now=time.time(),
                    )  # fmt: skip
            except (CatalogError, OSError) as e:
                log.info("OS %s not in the OS library: %s", name, e)
                self._published_oses.discard(name)  # the next task that builds it tries again
                return
            log.debug("OS %s in the OS library as %s", name, entry.id)

        await run_contained(log, f"publishing OS {name}", publish)

    async def _image_of(self, task_id: str, task: TaskFile) -> tuple[BlobId, ImageManifest]:
        """A ready image the task names, or one assembled from its OS, packages and files."""
        if task.image:
            if self._library is None:
                raise UnknownEntryError("this scheduler has no catalog to find images in")
            return await ready_manifest(self._library, self.blobs, task)
        assembler = Assembler(BuildCache(self._build_cache), self.blobs.blobs, self._boot())
        image = await assembler.assemble(task)
        return BlobId(bytes.fromhex(image.manifest_blob)), image.manifest

    # ---- dispatch ------------------------------------------------------------------------

    async def _serve_dispatch(self, stream: MessageStream) -> None:
        worker = stream.peer_id
        key = public_key_of(worker)
        # Where the connection comes from as we see it: what placement counts, not a peer ID.
        network = self._policy.network_of(worker, stream.remote_address())
        # The worker speaks at least every lease_timeout / 3 (heartbeats) or retry_after.
        stream.deadline = max(60.0, 4 * self._lease_timeout)
        self._workers[worker] = stream
        try:
            async with one_error(), trio.open_nursery() as held:
                async for raw in stream:
                    request_id, message = decode_request(raw)
                    if (
                        isinstance(message, WorkRequest)
                        and message.wait
                        and worker not in self._holding  # one per worker, on all its streams
                    ):
                        self._holding.add(worker)
                        held.start_soon(self._hold, stream, key, network, request_id, message)
                    else:
                        await self._answer(stream, key, network, request_id, message)
                held.cancel_scope.cancel()  # the worker closed the stream: nobody to answer
        finally:
            if self._workers.get(worker) is stream:
                del self._workers[worker]

    async def _hold(
        self,
        stream: MessageStream,
        key: bytes,
        network: str | None,
        request_id: int,
        message: WorkRequest,
    ) -> None:
        """Answer a work request that may wait for work (other requests go on meanwhile)."""
        assert message.wait is not None
        try:
            hold = min(message.wait, MAX_WORK_HOLD)
            await self._answer(stream, key, network, request_id, message, hold)
        finally:
            self._holding.discard(stream.peer_id)

    async def _answer(
        self,
        stream: MessageStream,
        key: bytes,
        network: str | None,
        request_id: int,
        message: Request,
        hold: float = 0.0,
    ) -> None:
        """Answer one request of ``stream``'s worker (whose public key is ``key``)."""
        worker = stream.peer_id
        if isinstance(message, ResultReport):
            # Signed by this worker before its blobs are fetched; not checked again.
            dispatch.check_report(worker, message, key)
            # Nothing is fetched for a lease this worker does not hold, or held and
            # let lapse while its task is live: the queue answers it STALE without.
            if await self.queue.may_report(worker, message.lease):
                await self._fetch_result(worker, message)
        answer, stops = await dispatch.handle(
            self.queue, worker, message, public_key=key, verified=True, network=network,
            hold=hold, present=lambda: not self.p2p.fell_silent(worker),
        )  # fmt: skip
        if isinstance(message, ResultReport):
            await self._settle_result(worker, message, answer)
        await stream.send(encode_answer(request_id, answer))
        await self.push_stops(stops)
        self.changed()

    async def _fetch_result(self, worker: str, report: ResultReport) -> None:
        """Copy the result's blobs here (from the worker, or any peer that has them already)
        before the result counts; all of them within one FETCH_TIMEOUT."""
        addrs = next((list(p.addrs) for p in self.p2p.peers() if p.peer_id == worker), [])
        # Each part no larger than an honest worker makes it: nothing more is fetched.
        blobs = [(report.stdout_blob, MAX_RESULT_OUTPUT), (report.stderr_blob, MAX_RESULT_OUTPUT)]
        if report.archive_blob is not None:
            blobs.append((report.archive_blob, MAX_RESULT_ARCHIVE))
        deadline = trio.current_time() + FETCH_TIMEOUT
        try:
            for blob, limit in blobs:
                left = max(0.0, deadline - trio.current_time())
                # Charged to the worker until the result counts (then to the task's owner) or
                # is refused (then removed): see _settle_result.
                await fetch_for_peer(
                    self.blobs, worker, BlobId(blob), sources=addrs, timeout=left,
                    max_size=limit, task=report.lease.task_id, keep_partial=True,
                )  # fmt: skip
            for name, blob, digest in (
                ("stdout", report.stdout_blob, report.stdout_digest),
                ("stderr", report.stderr_blob, report.stderr_digest),
            ):
                data = await read_small(self.blobs.blobs, BlobId(blob), max_size=MAX_RESULT_OUTPUT)
                if blake3.blake3(data).digest() != digest:
                    # The digests are what agreement compares; the owner gets these bytes.
                    raise RemoteProtocolError(f"{report.lease}: its {name} is not what it signed")
        except (BlobTooLargeError, PeerQuotaError, RemoteProtocolError) as e:
            with trio.CancelScope(shield=True):
                await self._release_result(worker, report)
            if isinstance(e, RemoteProtocolError):
                raise
            raise RemoteProtocolError(f"{report.lease}: {e}") from None
        except CatalogError as e:  # not here yet: the worker delivers the report again
            raise StreamBrokenError(f"result blobs of {report.lease}: {e}") from None

    async def _settle_result(self, worker: str, report: ResultReport, answer: object) -> None:
        """A counted result's blobs are charged to the task's owner from now on; those of a
        result that does not count are released, and removed if its word brought them."""
        if isinstance(answer, ResultAck) and answer.status is ResultStatus.RECORDED:
            owner = (await self.queue.status(report.lease.task_id)).spec.owner
            for blob in _result_blobs(report):
                await self.blobs.peer_quota.transfer(blob, worker, owner, task=report.lease.task_id)
        else:
            await self._release_result(worker, report)

    async def _release_result(self, worker: str, report: ResultReport) -> None:
        for blob in _result_blobs(report):
            if await self.blobs.peer_quota.release(worker, blob):
                await discard_blob(self.blobs, blob)

    # ---- logs ----------------------------------------------------------------------------

    async def _serve_logs(self, stream: MessageStream) -> None:
        stream.deadline = 3600.0  # a quiet task may print nothing for long
        refused = cut = 0
        async for raw in stream:
            chunk = LOGS.decode(raw)
            # Only the worker holding that very lease speaks for its output: a stranger's
            # frames (or a forged later attempt) never reach the owner's log.
            if self.queue.holder(chunk.lease) != stream.peer_id:
                refused += 1
                if refused == 1:
                    log.info("log frames from %s for %s, a lease it does not hold: dropped",
                             stream.peer_id, chunk.lease)  # fmt: skip
                continue
            buffer = self.log_buffer(chunk.lease.task_id)
            dropped = buffer.dropped
            buffer.add(chunk.lease, chunk.stream, chunk.data)
            if buffer.dropped > dropped:
                cut += 1
                if cut == 1:
                    log.info("log frames from %s for %s past its live-log budget: dropped",
                             stream.peer_id, chunk.lease)  # fmt: skip
                if buffer.dropped > MAX_LEASE_LOG:
                    # An honest worker stops at its budget: this one is only costing us reads.
                    raise RemoteProtocolError(f"{chunk.lease}: twice its live-log budget sent")

    def log_buffer(self, task_id: str) -> LogBuffer:
        """The task's live log; at most ``MAX_LOG_TASKS`` are kept, the least recently used
        dropped first (a finished task's result stands in for its log)."""
        buffer = self.logs.pop(task_id, None) or LogBuffer()
        self.logs[task_id] = buffer  # most recently used last
        while len(self.logs) > MAX_LOG_TASKS:
            del self.logs[next(iter(self.logs))]
        return buffer
