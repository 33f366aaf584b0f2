"""The task owner's side on their own node: local RPC ``task.*`` forwarded to a scheduler.

The owner's node picks the scheduler (``scheduler`` option, else the first found in the DHT),
sends the task file over ``/vmlend/tasks/1.0.0`` (the files it names go into our chunk store as
one archive, which the scheduler fetches), and remembers which
scheduler holds each task (``<data>/owner_tasks.json``), so every later call goes there.

RPC methods (MessagePack-RPC params: one map)::

    task.submit  {"text": TOML, "base_dir": ABS_DIR, "scheduler"?: PEER}   -> {"task_id", ...}
    task.status  {"task_id"?}            -> status map (or a list of them without task_id)
    task.wait    {"task_id", "timeout"?} -> status map once finished
    task.results {"task_id", "out"?: ABS_DIR} -> status map + stdout, stderr (+ out/out.tar)
    task.cancel  {"task_id"}             -> status map
    task.logs    {"task_id", "follow"?}  (streaming) notifications "task.log" [stream, data];
                                          result {"state"}
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import tarfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from catalog.blob import BlobId
from catalog.blob_service import BlobService
from catalog.errors import TaskFileError
from catalog.taskfile import TaskFile, loads
from node import rpc_params
from node.errors import NetworkError, RpcError
from node.p2p import P2PNode
from node.rpc_server import SendNotification
from scheduler_role.owner_api import TASKS_PROTOCOL
from scheduler_role.service import has_blob

log = logging.getLogger("vmlend.owner")

SCHEDULER_RECORD_KIND = "scheduler"
REQUEST_TIMEOUT = 60.0
MAX_SHIPPED_BYTES = 256 << 20

Handler = Callable[[list[Any]], Awaitable[Any]]
StreamHandler = Callable[[list[Any], SendNotification], Awaitable[Any]]


class OwnerService:
    def __init__(self, p2p: P2PNode, blobs: BlobService, data_dir: Path) -> None:
        self.p2p = p2p
        self.blobs = blobs
        self._path = data_dir / "owner_tasks.json"
        self._tasks: dict[str, str] = {}
        if self._path.exists():
            self._tasks = dict(json.loads(self._path.read_text()))

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {
            "task.submit": self._submit,
            "task.status": self._status,
            "task.wait": self._wait,
            "task.results": self._results,
            "task.cancel": self._cancel,
        }

    def rpc_streams(self) -> Mapping[str, StreamHandler]:
        return {"task.logs": self._logs}

    # ---- scheduler choice ----------------------------------------------------------------

    async def _schedulers(self) -> dict[str, list[str]]:
        delay = 0.2
        with trio.move_on_after(30.0):
            while True:
                records = await self.p2p.find_records(SCHEDULER_RECORD_KIND, timeout=10.0)
                if records:
                    return {str(r.payload["peer_id"]): list(r.payload["addrs"]) for r in records}
                await trio.sleep(delay)
                delay = min(2 * delay, 2.0)
        raise RpcError("no_scheduler", "no scheduler found in the DHT within 30 s")

    async def _ask(self, scheduler: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            if not self.p2p.is_connected(scheduler):
                found = await self._schedulers()
                for addr in found.get(scheduler, [])[:1]:
                    await self.p2p.connect(addr)
            # Not p2p.request: a wait may take far longer than the default stream deadline.
            limit = REQUEST_TIMEOUT + _timeout(request)
            with trio.fail_after(limit):
                async with await self.p2p.open_stream(scheduler, TASKS_PROTOCOL) as stream:
                    stream.deadline = limit
                    await stream.send(request)
                    await stream.send_end()
                    answer = await stream.receive()
        except trio.EndOfChannel:
            raise RpcError("scheduler_unreachable", f"{scheduler} ended without a reply") from None
        except trio.TooSlowError:
            raise RpcError("timeout", f"no answer from scheduler {scheduler} in time") from None
        except NetworkError as e:
            raise RpcError("scheduler_unreachable", f"scheduler {scheduler}: {e}") from e
        if answer.get("type") == "error":
            raise RpcError(str(answer.get("code")), str(answer.get("message")))
        return answer

    def _scheduler_of(self, task_id: str) -> str:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise RpcError("unknown_task", f"this node submitted no task {task_id}") from None

    def _remember(self, task_id: str, scheduler: str) -> None:
        self._tasks[task_id] = scheduler
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._tasks))
        tmp.replace(self._path)

    # ---- methods -------------------------------------------------------------------------

    async def _submit(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"text", "base_dir", "scheduler"})
        text, base = args.get("text"), args.get("base_dir")
        if not isinstance(text, str) or not isinstance(base, str) or not Path(base).is_absolute():
            raise RpcError("invalid_params", "expected text (TOML) and an absolute base_dir")
        try:
            task = loads(text, source="task file", base_dir=Path(base))
            files = await trio.to_thread.run_sync(_collect_files, task)
        except TaskFileError as e:
            raise RpcError("invalid_task", str(e)) from None
        scheduler = args.get("scheduler")
        if scheduler is None:
            found = await self._schedulers()
            scheduler = sorted(found)[0]
        task_id = f"{task.name}-{secrets.token_hex(5)}"
        request: dict[str, Any] = {"type": "submit", "task_id": task_id, "taskfile": text}
        if files:
            # The files travel through the chunk store: the scheduler fetches the archive from us.
            archive = await trio.to_thread.run_sync(_tar, files)
            blob = await self.blobs.blobs.add_bytes(archive)
            self.blobs.announce(blob)
            request |= {"files_blob": blob.hex(), "from": self.p2p.addrs}
        answer = await self._ask(str(scheduler), request)
        self._remember(task_id, str(scheduler))
        return {"task_id": task_id, "scheduler": scheduler, "new": answer.get("new", True)}

    async def _status(self, params: list[Any]) -> Any:
        args = _args(params, {"task_id"})
        if "task_id" not in args:
            out = []
            for task_id in list(self._tasks):
                try:
                    out.append(await self._one("status", task_id))
                except RpcError as e:
                    out.append({"task_id": task_id, "state": "unknown", "reason": e.message})
            return out
        return await self._one("status", str(args["task_id"]))

    async def _one(self, kind: str, task_id: str, **extra: Any) -> dict[str, Any]:
        answer = await self._ask(
            self._scheduler_of(task_id), {"type": kind, "task_id": task_id, **extra}
        )
        answer.pop("type", None)
        return answer

    async def _wait(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"task_id", "timeout"})
        timeout = float(args.get("timeout", 3600))
        return await self._one("wait", str(args.get("task_id")), timeout=timeout)

    async def _cancel(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"task_id"})
        return await self._one("cancel", str(args.get("task_id")))

    async def _results(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"task_id", "out"})
        task_id = str(args.get("task_id"))
        answer = await self._one("results", task_id)
        out = args.get("out")
        archive = answer.pop("archive_blob", None)
        addrs = answer.pop("addrs", [])
        if out is not None:
            if not isinstance(out, str) or not Path(out).is_absolute():
                raise RpcError("invalid_params", "out must be an absolute directory")
            where = trio.Path(out)
            await where.mkdir(parents=True, exist_ok=True)
            await (where / "stdout").write_bytes(answer["stdout"])
            await (where / "stderr").write_bytes(answer["stderr"])
            await (where / "exit_code").write_text(f"{answer.get('exit_code')}\n")
            if archive is not None:
                blob = BlobId(bytes.fromhex(archive))
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        if not await has_blob(self.blobs, blob):
                            await self.blobs.fetch(blob, sources=addrs[:1])
                except (NetworkError, trio.TooSlowError) as e:
                    raise RpcError("fetch_failed", f"fetching the /out archive: {e}") from e
                await self.blobs.blobs.export(blob, Path(out) / "out.tar")
        answer["archive"] = archive is not None
        return answer

    async def _logs(self, params: list[Any], send: SendNotification) -> dict[str, Any]:
        args = _args(params, {"task_id", "follow"})
        task_id = str(args.get("task_id"))
        scheduler = self._scheduler_of(task_id)
        request = {"type": "logs", "task_id": task_id, "follow": bool(args.get("follow"))}
        try:
            async with await self.p2p.open_stream(scheduler, TASKS_PROTOCOL) as stream:
                stream.deadline = 3600.0
                await stream.send(request)
                await stream.send_end()
                while True:
                    frame = await stream.receive()
                    if frame.get("type") == "log":
                        await send("task.log", [frame["stream"], frame["data"]])
                    elif frame.get("type") == "error":
                        raise RpcError(str(frame.get("code")), str(frame.get("message")))
                    else:
                        return {"state": frame.get("state")}
        except (NetworkError, trio.EndOfChannel) as e:
            raise RpcError("scheduler_unreachable", f"logs of {task_id}: {e}") from e


def _timeout(request: dict[str, Any]) -> float:
    value = request.get("timeout", 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def _args(params: list[Any], allowed: set[str]) -> dict[str, Any]:
    return rpc_params.options(params, 0, allowed, required=True)


def _collect_files(task: TaskFile) -> dict[str, bytes]:
    """The task's files and local package directories, by their path relative to the task."""
    base = task.base_dir.resolve()
    out: dict[str, bytes] = {}
    roots = [task.base_dir / f for f in task.files] + list(task.local_packages)
    for root in roots:
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in paths:
            resolved = path.resolve()
            if not resolved.is_relative_to(base):
                raise TaskFileError(f"outside {base}", source=str(path), key="files")
            if not resolved.is_file():
                raise TaskFileError("no such file", source=str(path), key="files")
            out[str(resolved.relative_to(base))] = resolved.read_bytes()
    if sum(len(v) for v in out.values()) > MAX_SHIPPED_BYTES:
        raise TaskFileError(
            f"the task's files exceed {MAX_SHIPPED_BYTES >> 20} MiB", source="files", key="files"
        )
    return out


def _tar(files: dict[str, bytes]) -> bytes:
    """A deterministic tar of ``files`` (sorted, no owners or times)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()
