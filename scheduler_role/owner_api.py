"""The scheduler's side of ``/vmlend/tasks/1.0.0``: what an owner's node asks on its owner's behalf.

One request per stream; the owner is the stream's authenticated peer ID. The files a task file
names come as one tar archive in the owner's chunk store (``files_blob``), fetched from the
owner's addresses (``from``) before the task is accepted. Requests and answers::

    {"type": "submit", "task_id", "taskfile": str, "files_blob"?: hex, "from"?: [MULTIADDR]}
        -> {"type": "submitted", "task_id", "new": bool}
    {"type": "status", "task_id"}                  -> {"type": "status", ...status_dict}
    {"type": "wait", "task_id", "timeout": s}      -> {"type": "status", ...} once finished
    {"type": "results", "task_id"}                 -> {"type": "results", "exit_code", "stdout",
                                                       "stderr", "archive_blob", "addrs", ...}
    {"type": "cancel", "task_id"}                  -> {"type": "status", ...}
    {"type": "logs", "task_id", "follow": bool}    -> {"type": "log", "stream", "data"}...
                                                      then {"type": "log_end", "state"}
    any refused request                            -> {"type": "error", "code", "message"}

A submit is refused when the task file is invalid, or when workers have asked for work but none
could ever hold the task (its caps exceed every worker's capacity) -- with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import tarfile
import time
from pathlib import Path
from typing import Any

import blake3
import trio

from catalog.blob import BlobId, parse_blob_id
from catalog.build.assemble import default_caps
from catalog.dispatch import result_digest
from catalog.errors import CatalogError, TaskFileError
from catalog.taskfile import TaskFile, load
from node.errors import NetworkError, RemoteProtocolError
from node.p2p_stream import MessageStream
from scheduler_role.errors import SchedulerError, UnknownTaskError
from scheduler_role.explain import explain
from scheduler_role.lifecycle import FINISHED_TASK_STATES
from scheduler_role.matching import violations
from scheduler_role.queue import StoredResult, TaskStatus
from scheduler_role.service import SchedulerService, has_blob
from scheduler_role.task import Limits, TaskSpec

log = logging.getLogger("vmlend.scheduler.owners")

TASKS_PROTOCOL = "/vmlend/tasks/1.0.0"
MAX_FILES = 256
MAX_OUTPUT_INLINE = 1 << 20
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

    async def serve(self, stream: MessageStream) -> None:
        request = await stream.receive()
        kind = request.get("type")
        stream.deadline = 3600.0  # wait and follow may take as long as the task
        try:
            if kind == "logs":
                await self._logs(stream, _task_id(request), bool(request.get("follow")))
                return
            answer = await self._answer(stream.peer_id, kind, request)
        except RefusedError as e:
            answer = {"type": "error", "code": e.code, "message": e.message}
        except UnknownTaskError as e:
            answer = {"type": "error", "code": "unknown_task", "message": str(e)}
        await stream.send(answer)

    async def _answer(self, owner: str, kind: object, request: dict[str, Any]) -> dict[str, Any]:
        task_id = _task_id(request)
        if kind == "submit":
            return await self._submit(owner, task_id, request)
        if kind == "status":
            return await self.status_dict(task_id)
        if kind == "wait":
            timeout = float(request.get("timeout", 3600))
            with trio.move_on_after(timeout):
                while (await self.queue.status(task_id)).state not in FINISHED_TASK_STATES:
                    await self.service.wait_changed(1.0)
            return await self.status_dict(task_id)
        if kind == "cancel":
            await self.service.push_stops(await self.queue.cancel(task_id))
            self.service.changed()
            return await self.status_dict(task_id)
        if kind == "results":
            return await self._results(task_id)
        raise RemoteProtocolError(f"unknown tasks request {kind!r}")

    # ---- submit --------------------------------------------------------------------------

    async def _submit(self, owner: str, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
        text, blob = request.get("taskfile"), request.get("files_blob")
        sources = request.get("from")
        if not isinstance(text, str):
            raise RemoteProtocolError("submit needs the task file's text")
        where = self.service.task_dir(task_id)
        archive = None
        if blob is not None:
            if not isinstance(blob, str) or not isinstance(sources, list):
                raise RemoteProtocolError("files_blob needs a blob ID and the owner's addresses")
            archive = where.parent / f"{task_id}.files.tar"
            await self._fetch_files(parse_blob_id(blob), [str(a) for a in sources[:1]], archive)
        await trio.to_thread.run_sync(_write_task, where, text, archive)
        try:
            task = load(where / "task.toml")
        except TaskFileError as e:
            raise RefusedError("invalid_task", str(e)) from None
        spec = spec_of(task, task_id, owner, time.time())
        self._check_placeable(spec)
        new = await self.queue.submit(spec)
        if new:
            self.service.start_assembly(task_id)
        self.service.changed()
        return {"type": "submitted", "task_id": task_id, "new": new}

    async def _fetch_files(self, blob: BlobId, sources: list[str], into: Path) -> None:
        blobs = self.service.blobs
        try:
            with trio.fail_after(FILES_TIMEOUT):
                if not await has_blob(blobs, blob):
                    await blobs.fetch(blob, sources=sources)
                await trio.Path(into.parent).mkdir(parents=True, exist_ok=True)
                await blobs.blobs.export(blob, into)
        except (CatalogError, NetworkError, trio.TooSlowError) as e:
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

    async def status_dict(self, task_id: str) -> dict[str, Any]:
        status = await self.queue.status(task_id)
        results = await self.queue.results(task_id)
        chosen = _chosen(status, results)
        return {
            "type": "status",
            "task_id": task_id,
            "state": status.state.value,
            "verdict": status.verdict.value if status.verdict is not None else None,
            "reason": status.reason,
            "finished": status.state in FINISHED_TASK_STATES,
            "exit_code": chosen.exit_code if chosen is not None else None,
            "replicas": [
                {"index": r.index, "state": r.state.value, "worker": r.worker,
                 "attempts": r.attempts}
                for r in status.replicas
            ],
            "results": len(results),
            "reported_by": list(status.reported),
            "dissenters": list(status.dissenters),
            "waiting": explain(status, self.queue.offers, self.queue.held_by()),
        }  # fmt: skip

    async def _results(self, task_id: str) -> dict[str, Any]:
        status = await self.queue.status(task_id)
        chosen = _chosen(status, await self.queue.results(task_id))
        answer = await self.status_dict(task_id)
        answer["type"] = "results"
        if chosen is None:
            return answer | {"stdout": b"", "stderr": b"", "archive_blob": None}
        answer["stdout"] = await self._read_blob(chosen.stdout_blob)
        answer["stderr"] = await self._read_blob(chosen.stderr_blob)
        archive = chosen.archive_blob
        answer["archive_blob"] = archive.hex() if archive is not None else None
        answer["addrs"] = self.service.p2p.addrs
        return answer

    async def _read_blob(self, blob: bytes) -> bytes:
        blobs = self.service.blobs
        if not await has_blob(blobs, BlobId(blob)):
            return b""
        path = self.service.data_dir / "exports" / f"{blob.hex()}.tmp"
        await trio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await blobs.blobs.export(BlobId(blob), path)
        data = await trio.Path(path).read_bytes()
        await trio.Path(path).unlink()
        return data[-MAX_OUTPUT_INLINE:]

    # ---- logs ----------------------------------------------------------------------------

    async def _logs(self, stream: MessageStream, task_id: str, follow: bool) -> None:
        status = await self.queue.status(task_id)  # UnknownTaskError for a wrong ID
        buffer = self.service.log_buffer(task_id)
        sent = 0
        source = buffer.source
        while True:
            if buffer.source != source:  # a new attempt started over
                source, sent = buffer.source, 0
            for kind, data in buffer.chunks[sent:]:
                await stream.send({"type": "log", "stream": kind, "data": data})
            sent = len(buffer.chunks)
            status = await self.queue.status(task_id)
            if not follow or status.state in FINISHED_TASK_STATES:
                break
            with trio.move_on_after(1.0):
                await buffer.changed.wait()
        if sent == 0 and status.state in FINISHED_TASK_STATES:
            # Nothing live (e.g. we restarted): the agreed result's output stands in.
            chosen = _chosen(status, await self.queue.results(task_id))
            if chosen is not None:
                for kind, blob in (("stdout", chosen.stdout_blob), ("stderr", chosen.stderr_blob)):
                    data = await self._read_blob(blob)
                    if data:
                        await stream.send({"type": "log", "stream": kind, "data": data})
        await stream.send({"type": "log_end", "state": status.state.value})


def _chosen(status: TaskStatus, results: list[StoredResult]) -> StoredResult | None:
    """The result to show: one of the agreed ones, else the latest."""
    for r in results:
        if status.agreed is not None and r.digest == status.agreed:
            return r
    return results[-1] if results else None


def _task_id(request: dict[str, Any]) -> str:
    task_id = request.get("task_id")
    if not isinstance(task_id, str):
        raise RemoteProtocolError("request without a task_id")
    return task_id


def _write_task(where: Path, text: str, archive: Path | None) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if archive is not None:
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                if len(members) > MAX_FILES:
                    raise RefusedError("invalid_task", f"more than {MAX_FILES} files")
                tar.extractall(where, filter="data")  # no absolute paths, links out, devices
        except (tarfile.TarError, OSError) as e:
            raise RefusedError("invalid_task", f"the task's files: {e}") from None
        finally:
            archive.unlink(missing_ok=True)
    (where / "task.toml").write_text(text)


def stdout_digest(data: bytes) -> bytes:
    """How workers digest stdout for :func:`result_digest`."""
    return blake3.blake3(data).digest()


__all__ = ["TASKS_PROTOCOL", "OwnerApi", "result_digest", "spec_of", "stdout_digest"]
