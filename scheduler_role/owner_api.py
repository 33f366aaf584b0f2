"""The scheduler's side of ``/vmlend/tasks/1.0.0`` (:mod:`catalog.owner_protocol`).

One request per stream; the owner is the stream's authenticated peer ID. A request is decoded
into its typed message before anything else happens. A submit is accepted only once the task and
its files are durable here: its files archive is fetched from the owner, unpacked (no
compression, bounded in members and bytes, nothing outside the task's directory) into a directory
named by the checked task ID, and the parsed task is written there with fsync. A submit is
refused when the task is invalid, or when workers have asked for work but none could ever hold
the task (its caps exceed every worker's capacity) -- with the reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
import stat
import time
from pathlib import Path

import blake3
import trio

from catalog.blob import BlobId
from catalog.blob_fetch import discard_blob, fetch_for_peer, read_small
from catalog.build.assemble import buildable_oses, default_caps
from catalog.errors import BlobTooLargeError, CatalogError, IncompleteBlobError, UnknownBlobError
from catalog.owner_protocol import (
    MAX_OUTPUT_INLINE,
    REPLIES,
    REQUESTS,
    CancelRequest,
    LogData,
    LogEnd,
    LogsRequest,
    Refused,
    ReplicaView,
    Reply,
    ResultsRequest,
    StatusRequest,
    Submit,
    Submitted,
    TaskResults,
    TaskStatus,
    WaitRequest,
)
from catalog.peer_quota import PeerQuotaError
from catalog.task_wire import archive_members
from catalog.taskfile import TaskFile
from node.errors import NetworkError, RemoteProtocolError
from node.p2p_stream import MessageStream
from node.units import format_duration, format_size
from scheduler_role.errors import SchedulerError, TaskConflictError, UnknownTaskError
from scheduler_role.explain import explain
from scheduler_role.lifecycle import FINISHED_TASK_STATES
from scheduler_role.live_logs import LogCursor
from scheduler_role.matching import violations
from scheduler_role.queue import StoredResult
from scheduler_role.queue import TaskStatus as QueueStatus
from scheduler_role.service import SchedulerService
from scheduler_role.task import Limits, TaskSpec
from scheduler_role.task_store import (
    FILES_DIR,
    MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_MEMBERS,
    TaskFilesError,
    discard,
    settle,
    store_task,
    unpack_files,
)

log = logging.getLogger("vmlend.scheduler.owners")

FILES_TIMEOUT = 120.0


def spec_of(task: TaskFile, task_id: str, owner: str, now: float) -> TaskSpec:
    deadline = task.limits.deadline
    if isinstance(deadline, dt.datetime):
        absolute: float | None = deadline.timestamp()
    else:
        absolute = None if deadline is None else now + deadline
    return TaskSpec(
        task_id=task_id,
        owner=owner,
        caps=default_caps(task),
        limits=Limits(
            max_runtime=task.limits.max_runtime,
            deadline=absolute,
            max_attempts=task.limits.max_attempts,
        ),
        replicas=task.replicas,
        quorum=task.quorum,
        workers=frozenset(task.workers),
    )


class RefusedError(SchedulerError):
    """The owner's request was refused; ``code`` says why, for the owner's node."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OwnerApi:
    def __init__(self, service: SchedulerService) -> None:
        self.service = service
        self.queue = service.queue
        self._settling = trio.Lock()

    async def serve(self, stream: MessageStream) -> None:
        stream.deadline = 3600.0  # wait and follow may take as long as the task
        try:
            request = REQUESTS.decode(await stream.receive())
            if isinstance(request, LogsRequest):
                await self._logs(stream, request)
                return
            answer = await self._answer(stream.peer_id, request)
        except RefusedError as e:
            answer = Refused(code=e.code, message=e.message[:4096])
        except UnknownTaskError as e:
            kept = format_duration(self.service.keep_finished)
            message = f"{e} (a finished task is kept {kept} after it ends, then forgotten)"
            answer = Refused(code="unknown_task", message=message)
        except TaskFilesError as e:
            answer = Refused(code="invalid_task", message=str(e)[:4096])
        except RemoteProtocolError as e:
            log.info("bad tasks request from %s: %s", stream.peer_id, str(e)[:200])
            answer = Refused(code="bad_request", message=str(e)[:4096])
        await stream.send(REPLIES.encode(answer))

    async def _answer(
        self,
        owner: str,
        request: Submit | StatusRequest | WaitRequest | CancelRequest | ResultsRequest,
    ) -> Reply:
        if isinstance(request, Submit):
            return await self._submit(owner, request)
        task_id = request.task_id
        await self._check_owner(task_id, owner)
        if isinstance(request, WaitRequest):
            with trio.move_on_after(request.timeout):
                while (await self.queue.status(task_id)).state not in FINISHED_TASK_STATES:
                    await self.service.wait_changed(1.0)
        elif isinstance(request, CancelRequest):
            await self.service.push_stops(await self.queue.cancel(task_id))
            self.service.changed()
        elif isinstance(request, ResultsRequest):
            return await self._results(task_id)
        return await self.status(task_id)

    async def _check_owner(self, task_id: str, peer: str) -> QueueStatus:
        """The task's status, if ``peer`` submitted it. Anyone else is told there is no such
        task: a worker learns task IDs from its grants, and must not read, follow or cancel
        what it runs, nor learn which IDs exist."""
        status = await self.queue.status(task_id)  # UnknownTaskError for a wrong ID
        if status.spec.owner != peer:
            raise UnknownTaskError(task_id)
        return status

    # ---- submit --------------------------------------------------------------------------

    async def _submit(self, owner: str, request: Submit) -> Submitted:
        task_id = request.task_id
        where = self.service.task_dir(task_id)
        task = dataclasses.replace(request.task, base_dir=where / FILES_DIR)
        members = archive_members(task)
        if members and request.files_blob is None:
            raise RefusedError("invalid_task", "the task names files but sent no archive of them")
        if not task.image and task.os not in buildable_oses():
            raise RefusedError(
                "invalid_task",
                f"unknown OS {task.os[:64]!r}: this scheduler builds "
                f"{', '.join(buildable_oses())} (or name a published image with image = ...)",
            )
        spec = spec_of(task, task_id, owner, time.time())
        self._check_placeable(spec)
        if await self._known(task_id):  # a repeated submit: idempotent, or a conflict
            return await self._enqueue(spec)
        await self._check_room(owner)
        # Staged under a name of our own, so concurrent submits of one ID never share files.
        staging = where.parent / f".staging-{secrets.token_hex(8)}"
        try:
            if request.files_blob is not None:
                archive = staging.with_suffix(".tar")
                await self._fetch_files(
                    owner, BlobId(request.files_blob), list(request.providers), archive
                )
                await trio.to_thread.run_sync(unpack_files, archive, staging / FILES_DIR, members)
            # The unpacked files stay for the task's life: the owner's quota holds them too.
            files_size = await trio.to_thread.run_sync(tree_size, staging / FILES_DIR)
            await self._check_room(owner, files_size)
            await trio.to_thread.run_sync(store_task, staging, task)
            async with self._settling:
                if not await self._known(task_id):
                    await trio.to_thread.run_sync(settle, staging, where)
                    if files_size:
                        await self.service.blobs.peer_quota.charge(
                            owner, files_charge(task_id), files_size, created=False, task=task_id
                        )
                return await self._enqueue(spec)
        finally:
            await trio.to_thread.run_sync(discard, staging)

    async def _check_room(self, owner: str, size: int = 1) -> None:
        """Refuse an owner whose quota has no room for ``size`` more bytes; a task without files
        needs room too: its results would be charged to that owner."""
        try:
            await self.service.blobs.peer_quota.check(owner, max(size, 1))
        except PeerQuotaError as e:
            raise RefusedError(
                e.code,
                f"quota exceeded: your tasks' files and results take {format_size(e.used)} here, "
                f"your quota is {format_size(e.quota)}; they are freed as your finished tasks "
                f"are forgotten, {format_duration(self.service.keep_finished)} after they end",
            ) from None

    async def _known(self, task_id: str) -> bool:
        try:
            await self.queue.status(task_id)
        except UnknownTaskError:
            return False
        return True

    async def _enqueue(self, spec: TaskSpec) -> Submitted:
        try:
            new = await self.queue.submit(spec)
        except TaskConflictError as e:
            raise RefusedError("conflict", str(e)) from None
        if new:
            self.service.start_assembly(spec.task_id)
        self.service.changed()
        return Submitted(task_id=spec.task_id, new=new)

    async def _fetch_files(self, owner: str, blob: BlobId, sources: list[str], into: Path) -> None:
        """The task's files archive, fetched within the owner's quota and exported to ``into``;
        the blob is not kept (the task uses its directory), so a refused submit leaves none."""
        blobs = self.service.blobs
        try:
            # Its tar headers come on top of the files' own bytes: one block per member.
            limit = MAX_ARCHIVE_BYTES + MAX_ARCHIVE_MEMBERS * 1024
            await fetch_for_peer(
                blobs, owner, blob, sources=sources, timeout=FILES_TIMEOUT, max_size=limit
            )
            try:
                await trio.Path(into.parent).mkdir(parents=True, exist_ok=True)
                await blobs.blobs.export(blob, into)
            finally:
                with trio.CancelScope(shield=True):
                    if await blobs.peer_quota.release(owner, blob):
                        await discard_blob(blobs, blob)
        except PeerQuotaError as e:
            raise RefusedError(e.code, str(e)) from None
        except BlobTooLargeError as e:
            raise RefusedError("invalid_task", f"the task's files: {e}") from None
        except (CatalogError, NetworkError) as e:
            raise RefusedError("files_unavailable", f"fetching the task's files: {e}") from None

    def _check_placeable(self, spec: TaskSpec) -> None:
        """Refuse a task no worker seen could ever hold (unknowable with no worker seen)."""
        offers = self.queue.offers
        if not offers:
            return
        found = {w: violations(seen.offer.capacity, spec.caps) for w, seen in offers.items()}
        fitting = [w for w, v in found.items() if not v]
        if len(fitting) >= spec.quorum:
            return
        reasons = sorted({v.message for vs in found.values() for v in vs})
        raise RefusedError(
            "unplaceable",
            f"no {'worker' if spec.quorum == 1 else f'{spec.quorum} workers'} could ever run "
            f"this task ({len(fitting)} of {len(offers)} fit): " + "; ".join(reasons),
        )

    # ---- status and results --------------------------------------------------------------

    async def status(self, task_id: str) -> TaskStatus:
        q = self.queue
        status = await q.status(task_id)
        results = await q.results(task_id)
        chosen = _chosen(status, results)
        fetched = q.fetched(task_id)
        return TaskStatus(
            task_id=task_id,
            state=status.state.value,
            verdict=status.verdict.value if status.verdict is not None else None,
            reason=status.reason[:4096],
            finished=status.state in FINISHED_TASK_STATES,
            exit_code=chosen.exit_code if chosen is not None else None,
            replicas=tuple(
                ReplicaView(index=r.index, state=r.state.value, worker=r.worker,
                            attempts=r.attempts, fetched=fetched.get(r.index))
                for r in status.replicas
            ),
            results=len(results),
            reported_by=tuple(status.reported),
            dissenters=tuple(status.dissenters),
            waiting=tuple(explain(status, q.offers, q.held_by(), await q.sidelined())),
            submitted_at=status.submitted_at, running_since=status.running_since,
            finished_at=status.finished_at,
        )  # fmt: skip

    async def _results(self, task_id: str) -> TaskResults:
        status = await self.queue.status(task_id)
        chosen = _chosen(status, await self.queue.results(task_id))
        view = await self.status(task_id)
        if chosen is None:
            stdout, stderr = self._partial_output(task_id) if view.finished else (b"", b"")
            return TaskResults(status=view, stdout=stdout, stderr=stderr, partial=view.finished)
        stdout = await self._read_blob(chosen.stdout_blob)
        stderr = await self._read_blob(chosen.stderr_blob)
        for name, data, digest in (
            ("stdout", stdout, chosen.stdout_digest),
            ("stderr", stderr, chosen.stderr_digest),
        ):
            # Exactly the bytes the quorum agreed on, or a refusal: never something else.
            if blake3.blake3(data).digest() != digest:
                raise RefusedError("results_unavailable", f"the agreed {name} is not here")
        return TaskResults(
            status=view,
            stdout=stdout,
            stderr=stderr,
            archive_blob=chosen.archive_blob,
            providers=tuple(self.service.p2p.addrs[:16]),
        )

    def _partial_output(self, task_id: str) -> tuple[bytes, bytes]:
        """What the task's last run printed before it ended with no agreed result: the live
        log still held here (in memory: none after a restart), the last bytes of each stream."""
        buffer = self.service.logs.get(task_id)
        if buffer is None:
            return b"", b""
        out = {"stdout": bytearray(), "stderr": bytearray()}
        for stream, data in buffer.read(LogCursor(buffer.source))[0]:
            out[stream] += data
        return bytes(out["stdout"][-MAX_OUTPUT_INLINE:]), bytes(out["stderr"][-MAX_OUTPUT_INLINE:])

    async def _read_blob(self, blob: bytes) -> bytes:
        """A result's output, as its worker stored it (an honest worker keeps at most
        ``MAX_OUTPUT_INLINE`` of it; a larger blob is not read)."""
        try:
            return await read_small(
                self.service.blobs.blobs, BlobId(blob), max_size=MAX_OUTPUT_INLINE
            )
        except (UnknownBlobError, IncompleteBlobError):
            return b""
        except BlobTooLargeError as e:
            log.warning("result output %s not shown: %s", blob.hex()[:16], e)
            return b""

    # ---- logs ----------------------------------------------------------------------------

    async def _logs(self, stream: MessageStream, request: LogsRequest) -> None:
        task_id = request.task_id
        status = await self._check_owner(task_id, stream.peer_id)
        buffer = self.service.log_buffer(task_id)
        cursor = LogCursor(buffer.source)
        while True:
            changed = buffer.changed  # a frame taken while we send wakes the next wait
            # The status first: what the worker sent before its result is then in the buffer.
            status = await self.queue.status(task_id)
            pieces, cursor = buffer.read(cursor)  # a new attempt starts over
            for kind, data in pieces:
                await stream.send(REPLIES.encode(LogData(stream=kind, data=data)))
            if not request.follow or status.state in FINISHED_TASK_STATES:
                break
            with trio.move_on_after(1.0):
                await changed.wait()
        if not cursor.read_any and status.state in FINISHED_TASK_STATES:
            # Nothing live (e.g. we restarted): the agreed result's output stands in.
            chosen = _chosen(status, await self.queue.results(task_id))
            if chosen is not None:
                for kind, blob in (("stdout", chosen.stdout_blob), ("stderr", chosen.stderr_blob)):
                    data = await self._read_blob(blob)
                    if data:
                        await stream.send(REPLIES.encode(LogData(stream=kind, data=data)))
        await stream.send(REPLIES.encode(LogEnd(state=status.state.value)))


def _chosen(status: QueueStatus, results: list[StoredResult]) -> StoredResult | None:
    """The result to show: the first agreed one. Without an agreement there is none: a result
    nobody confirmed (perhaps a forged one) is never handed to the owner as the answer."""
    if status.agreed is None:
        return None
    return next((r for r in results if r.digest == status.agreed), None)


__all__ = ["OwnerApi", "spec_of"]


def files_charge(task_id: str) -> BlobId:
    """The ledger entry for a task's unpacked files: no blob has this ID (a blob's is the hash
    of its manifest), so it only holds the owner's bytes until the task is forgotten."""
    return BlobId(blake3.blake3(b"vmlend task files\0" + task_id.encode()).digest())


def tree_size(root: Path) -> int:
    """Bytes of the regular files below ``root`` (0 if there is no such directory)."""
    total = 0
    for path in root.rglob("*") if root.is_dir() else ():
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
    return total
