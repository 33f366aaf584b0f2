"""The task owner's side on their own node: local RPC ``task.*`` forwarded to a scheduler.

The owner's node picks the scheduler (``scheduler`` option, else the default among those found
in the DHT by the rule of :mod:`catalog.scheduler_choice`: trusted first, then those it already
has tasks with, then its own secret ranking; the first of them it can reach; submitting to an
untrusted one is logged once). It parses the task file here, once, and sends the typed task over
``/vmlend/tasks/1.0.0`` (:mod:`catalog.owner_protocol`). The files and local package
directories it names go into our chunk store as one archive, which the scheduler fetches from us.
The node remembers which scheduler holds each task (``<data>/owner_tasks.json``), so every later
call goes there.

RPC methods (MessagePack-RPC params: one map)::

    task.submit  {"text": TOML, "base_dir": ABS_DIR, "scheduler"?: PEER}   -> {"task_id", ...}
                 or {"task": TASK (catalog.task_wire), "base_dir", "scheduler"?}
    task.status  {"task_id"?}            -> status map (or a list of them without task_id)
    task.wait    {"task_id", "timeout"?} -> status map once finished
    task.results {"task_id", "out"?: ABS_DIR} -> status map + stdout, stderr (+ out/out.tar),
                                          partial: no agreed result, the output as far as it got
    task.cancel  {"task_id"}             -> status map
    task.logs    {"task_id", "follow"?}  (streaming) notifications "task.log" [stream, data];
                                          result {"state"}
    task.resolve {"task_id"}             -> {"task_id"}: the whole ID a unique start names

Every ``task_id`` may be the start of one (of the ID or of its random part) that only one task
of this node has.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import tarfile
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import trio

from catalog.blob import BlobId
from catalog.blob_fetch import ensure_blob
from catalog.blob_service import BlobService
from catalog.dispatch import MAX_RESULT_ARCHIVE
from catalog.errors import CatalogError, TaskFileError
from catalog.owner_protocol import (
    MAX_PROVIDERS,
    PROTOCOL_ID,
    REPLIES,
    REQUESTS,
    WIRE_LIMITS,
    CancelRequest,
    LogData,
    LogEnd,
    LogsRequest,
    Refused,
    Reply,
    Request,
    ResultsRequest,
    StatusRequest,
    Submit,
    Submitted,
    TaskResults,
    TaskStatus,
    WaitRequest,
)
from catalog.scheduler_choice import SchedulerChoice, choice_key
from catalog.scheduler_record import SchedulerDirectory, cut
from catalog.task_wire import archive_members, task_from_wire
from catalog.taskfile import TaskFile, loads
from node import rpc_params
from node.durable import read_state, write_atomically
from node.errors import LocalProtocolError, NetworkError, RemoteProtocolError, RpcError
from node.p2p import P2PNode
from node.rpc_server import SendNotification
from node.wire_fields import as_id

log = logging.getLogger("vmlend.owner")

SCHEDULER_RECORD_KIND = "scheduler"
REQUEST_TIMEOUT = 60.0
FIND_TIMEOUT = 30.0  # to find any scheduler at all
TRUSTED_WAIT = 10.0  # ... and, with trusted schedulers set but none found yet, to find one of them
MAX_TRIED = 4  # schedulers tried in turn when the default one cannot be reached
MAX_WARNED = 1024  # untrusted schedulers warned about, remembered to warn once
MAX_SHIPPED_BYTES = 256 << 20

Handler = Callable[[list[Any]], Awaitable[Any]]
StreamHandler = Callable[[list[Any], SendNotification], Awaitable[Any]]


class OwnerService:
    METHODS = (
        "task.submit",
        "task.status",
        "task.wait",
        "task.results",
        "task.cancel",
        "task.logs",
        "task.resolve",
    )

    def __init__(
        self,
        p2p: P2PNode,
        blobs: BlobService,
        data_dir: Path,
        *,
        choice: SchedulerChoice | None = None,
    ) -> None:
        """``choice``: the node's scheduler rule (default: its own key, trusting none)."""
        self.p2p = p2p
        self.blobs = blobs
        self.choice = choice or SchedulerChoice(choice_key(p2p.identity.private_bytes))
        self._warned: set[str] = set()
        self._path = data_dir / "owner_tasks.json"
        self._tasks: dict[str, str] = read_state(self._path, _task_map) or {}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {
            "task.submit": self._submit,
            "task.status": self._status,
            "task.wait": self._wait,
            "task.results": self._results,
            "task.cancel": self._cancel,
            "task.resolve": self._resolve_rpc,
        }

    def rpc_streams(self) -> Mapping[str, StreamHandler]:
        return {"task.logs": self._logs}

    # ---- scheduler choice ----------------------------------------------------------------

    def known_schedulers(self) -> set[str]:
        """The schedulers this node has tasks with (rule 2 of :mod:`catalog.scheduler_choice`)."""
        return set(self._tasks.values())

    def default_scheduler(self, found: Iterable[str]) -> str | None:
        """Which of ``found`` a submission without a scheduler goes to, if it is reachable."""
        return self.choice.choose(found, known=self.known_schedulers())

    async def _schedulers(self, *, trusted_wait: float = 0.0) -> dict[str, list[str]]:
        """The schedulers in the DHT, by peer ID. With trusted ones set, the search goes on for
        up to ``trusted_wait`` seconds until one of them is among them (records arrive in any
        order, and a stranger's must not win the default choice just by being found first)."""
        directory = SchedulerDirectory(self.p2p)
        delay = 0.2
        trusted_by = trio.current_time() + trusted_wait
        found: dict[str, list[str]] = {}
        with trio.move_on_after(FIND_TIMEOUT):
            while True:
                found = {s.peer_id: list(s.addrs) for s in await directory.find(timeout=10.0)}
                settled = not self.choice.trusted or trio.current_time() >= trusted_by
                if found and (settled or any(map(self.choice.is_trusted, found))):
                    return found
                await trio.sleep(delay)
                delay = min(2 * delay, 2.0)
        if found:
            return found
        raise RpcError("no_scheduler", f"no scheduler found in the DHT within {FIND_TIMEOUT:g} s")

    async def _default_scheduler(self) -> str:
        """The first scheduler in this node's order (the module docstring) that it can reach,
        trying at most :data:`MAX_TRIED`; the submission has not been sent to any yet."""
        found = await self._schedulers(trusted_wait=TRUSTED_WAIT)
        ranked = self.choice.rank(found, known=self.known_schedulers())
        problems = []
        for scheduler in ranked[:MAX_TRIED]:
            if self.p2p.is_connected(scheduler):
                return scheduler
            if not found[scheduler]:
                problems.append(f"{scheduler}: its record has no address")
            for addr in found[scheduler][:1]:
                try:
                    await self.p2p.connect(addr)
                except NetworkError as e:
                    log.info("default scheduler %s unreachable: %s", scheduler, e)
                    problems.append(f"{scheduler}: {e}")
                else:
                    return scheduler
        raise RpcError(
            "scheduler_unreachable",
            f"none of the schedulers tried could be reached: {cut('; '.join(problems))}",
        )

    def _note_untrusted(self, scheduler: str) -> None:
        if self.choice.is_trusted(scheduler) or scheduler in self._warned:
            return
        if len(self._warned) >= MAX_WARNED:
            self._warned.clear()
        self._warned.add(scheduler)
        log.warning(
            "submitting to scheduler %s, which is not in network.trusted_schedulers: it will "
            "see this node's tasks and files (vmlend schedulers lists them)",
            scheduler,
        )

    async def _ask(self, scheduler: str, request: Request) -> Reply:
        try:
            if not self.p2p.is_connected(scheduler):
                found = await self._schedulers()
                for addr in found.get(scheduler, [])[:1]:
                    await self.p2p.connect(addr)
            # Not p2p.request: a wait may take far longer than the default stream deadline.
            limit = REQUEST_TIMEOUT + (request.timeout if isinstance(request, WaitRequest) else 0)
            with trio.fail_after(limit):
                async with await self.p2p.open_stream(
                    scheduler, PROTOCOL_ID, limits=WIRE_LIMITS
                ) as stream:
                    stream.deadline = limit
                    await stream.send(REQUESTS.encode(request))
                    await stream.send_end()
                    answer = REPLIES.decode(await stream.receive())
        except trio.EndOfChannel:
            raise RpcError("scheduler_unreachable", f"{scheduler} ended without a reply") from None
        except trio.TooSlowError:
            raise RpcError("timeout", f"no answer from scheduler {scheduler} in time") from None
        except NetworkError as e:
            raise RpcError("scheduler_unreachable", f"scheduler {scheduler}: {e}") from e
        except RemoteProtocolError as e:
            raise RpcError("bad_answer", f"scheduler {scheduler}: {e}") from e
        if isinstance(answer, Refused):
            raise RpcError(answer.code, answer.message)
        return answer

    def _scheduler_of(self, task_id: str) -> str:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise RpcError("unknown_task", f"this node submitted no task {task_id}") from None

    def _resolve(self, args: Mapping[str, Any]) -> str:
        """The task the caller named: its ID, or the start of one (of the ID or of its random
        part) that only one task of this node has."""
        return resolve_task_id(_task_id(args), self._tasks)

    async def _resolve_rpc(self, params: list[Any]) -> dict[str, Any]:
        task_id = self._resolve(_args(params, {"task_id"}))
        self._scheduler_of(task_id)  # unknown_task for an ID no task of ours has
        return {"task_id": task_id}

    async def _remember(self, task_id: str, scheduler: str | None) -> None:
        """Note (or, with ``None``, drop) which scheduler holds the task, durably."""
        if scheduler is None:
            self._tasks.pop(task_id, None)
        else:
            self._tasks[task_id] = scheduler
        data = json.dumps(self._tasks).encode()
        await trio.to_thread.run_sync(write_atomically, self._path, data)

    # ---- methods -------------------------------------------------------------------------

    async def _submit(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"text", "task", "base_dir", "scheduler"})
        task = await trio.to_thread.run_sync(_task_of, args)
        scheduler = args.get("scheduler")
        if scheduler is None:
            scheduler = await self._default_scheduler()
        if not isinstance(scheduler, str):
            raise RpcError("invalid_params", "scheduler must be a peer ID")
        self._note_untrusted(scheduler)
        task_id = f"{task.name}-{secrets.token_hex(5)}"
        files_blob = None
        if archive_members(task):
            # The files travel through the chunk store: the scheduler fetches the archive from us.
            try:
                archive = await trio.to_thread.run_sync(_tar, task)
            except TaskFileError as e:
                raise RpcError("invalid_task", str(e)) from None
            blob = await self.blobs.blobs.add_bytes(archive)
            self.blobs.announce(blob)
            files_blob = bytes(blob)
        request = Submit(
            task_id=task_id,
            task=task,
            files_blob=files_blob,
            providers=tuple(self.p2p.addrs[:MAX_PROVIDERS]),
        )
        # Remembered before it is sent: a task the scheduler may have accepted is never lost
        # track of, whatever happens to the answer; a definite refusal forgets it again.
        await self._remember(task_id, scheduler)
        try:
            answer = await self._ask(scheduler, request)
        except RpcError as e:
            if e.code not in _OUTCOME_UNKNOWN:
                await self._remember(task_id, None)
            raise
        if not isinstance(answer, Submitted):
            raise RpcError(
                "bad_answer", f"scheduler {scheduler} answered a submit with {answer.TYPE}"
            )
        return {"task_id": task_id, "scheduler": scheduler, "new": answer.new}

    async def _status(self, params: list[Any]) -> Any:
        args = _args(params, {"task_id"})
        if "task_id" not in args:
            out = []
            for task_id in list(self._tasks):
                try:
                    out.append(await self._one(StatusRequest(task_id=task_id)))
                except RpcError as e:
                    out.append({"task_id": task_id, "state": "unknown", "reason": e.message})
            return out
        return await self._one(StatusRequest(task_id=self._resolve(args)))

    async def _one(self, request: Request) -> dict[str, Any]:
        """The status map of the request's task (the RPC's answer), from its scheduler."""
        answer = await self._ask(self._scheduler_of(request.task_id), request)
        if not isinstance(answer, TaskStatus):
            raise RpcError("bad_answer", f"expected a task status, got {answer.TYPE}")
        return answer.to_rpc()

    async def _wait(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"task_id", "timeout"})
        timeout = rpc_params.timeout_option(args, default=3600, maximum=7 * 24 * 3600)
        return await self._one(WaitRequest(task_id=self._resolve(args), timeout=float(timeout)))

    async def _cancel(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"task_id"})
        return await self._one(CancelRequest(task_id=self._resolve(args)))

    async def _results(self, params: list[Any]) -> dict[str, Any]:
        args = _args(params, {"task_id", "out"})
        task_id = self._resolve(args)
        reply = await self._ask(self._scheduler_of(task_id), ResultsRequest(task_id=task_id))
        if not isinstance(reply, TaskResults):
            raise RpcError("bad_answer", f"expected results, got {reply.TYPE}")
        answer = reply.status.to_rpc() | {"stdout": reply.stdout, "stderr": reply.stderr}
        answer["partial"] = reply.partial
        out = args.get("out")
        archive = reply.archive_blob
        if out is not None:
            if not isinstance(out, str) or not Path(out).is_absolute():
                raise RpcError("invalid_params", "out must be an absolute directory")
            where = trio.Path(out)
            await where.mkdir(parents=True, exist_ok=True)
            await (where / "stdout").write_bytes(answer["stdout"])
            await (where / "stderr").write_bytes(answer["stderr"])
            exit_file = where / "exit_code"
            if answer.get("exit_code") is not None:
                await exit_file.write_text(f"{answer['exit_code']}\n")
            else:  # no file saying "None"; nor an earlier result's code left behind
                await exit_file.unlink(missing_ok=True)
            if archive is not None:
                blob = BlobId(archive)
                try:
                    await ensure_blob(
                        self.blobs, blob, timeout=REQUEST_TIMEOUT, sources=reply.providers,
                        max_size=MAX_RESULT_ARCHIVE,
                    )  # fmt: skip
                except (CatalogError, NetworkError) as e:
                    raise RpcError("fetch_failed", f"fetching the /out archive: {e}") from e
                await self.blobs.blobs.export(blob, Path(out) / "out.tar")
        answer["archive"] = archive is not None
        return answer

    async def _logs(self, params: list[Any], send: SendNotification) -> dict[str, Any]:
        args = _args(params, {"task_id", "follow"})
        follow = args.get("follow", False)
        if not isinstance(follow, bool):
            raise RpcError("invalid_params", "follow must be true or false")
        request = LogsRequest(task_id=self._resolve(args), follow=follow)
        scheduler = self._scheduler_of(request.task_id)
        try:
            async with await self.p2p.open_stream(
                scheduler, PROTOCOL_ID, limits=WIRE_LIMITS
            ) as stream:
                stream.deadline = 3600.0
                await stream.send(REQUESTS.encode(request))
                await stream.send_end()
                while True:
                    frame = REPLIES.decode(await stream.receive())
                    if isinstance(frame, LogData):
                        await send("task.log", [frame.stream, frame.data])
                    elif isinstance(frame, Refused):
                        raise RpcError(frame.code, frame.message)
                    elif isinstance(frame, LogEnd):
                        return {"state": frame.state}
                    else:
                        raise RemoteProtocolError(f"{frame.TYPE} in a log stream")
        except (NetworkError, RemoteProtocolError, trio.EndOfChannel) as e:
            raise RpcError("scheduler_unreachable", f"logs of {request.task_id}: {e}") from e


# Errors after which the scheduler may or may not hold the task.
_OUTCOME_UNKNOWN = frozenset({"scheduler_unreachable", "timeout", "bad_answer"})


def _task_map(data: bytes) -> dict[str, str]:
    raw = json.loads(data)
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ValueError("not a map of task IDs to scheduler peer IDs")
    return raw


def _args(params: list[Any], allowed: set[str]) -> dict[str, Any]:
    return rpc_params.options(params, 0, allowed, required=True)


def resolve_task_id(given: str, known: Iterable[str]) -> str:
    """``given`` if it is a task ID of ``known``; else the one ID of ``known`` that starts with
    it, or whose random part (after the last ``-``) does. A prefix several match is refused
    with some of them; one that none does is returned as it is (the caller reports it)."""
    ids = set(known)
    if given in ids:
        return given
    matches = sorted(t for t in ids if given in (t[: len(given)], _random_part(t)[: len(given)]))
    if len(matches) == 1:
        return matches[0]
    if matches:
        more = len(matches) - 4
        shown = ", ".join(matches[:4]) + (f" and {more} more" if more > 0 else "")
        raise RpcError(
            "ambiguous_task", f"{given!r} starts {len(matches)} task IDs ({shown}): give more of it"
        )
    return given


def _random_part(task_id: str) -> str:
    return task_id.rpartition("-")[2]


def _task_id(args: Mapping[str, Any]) -> str:
    try:
        return as_id("task_id", args.get("task_id"))
    except LocalProtocolError as e:
        raise RpcError("invalid_params", str(e)) from None


def _task_of(args: Mapping[str, Any]) -> TaskFile:
    """The task the caller gave: TOML text (parsed here) or an already parsed task, its paths
    relative to ``base_dir``."""
    base = args.get("base_dir")
    if not isinstance(base, str) or not Path(base).is_absolute():
        raise RpcError("invalid_params", "expected an absolute base_dir")
    text, wire_task = args.get("text"), args.get("task")
    if (text is None) == (wire_task is None):
        raise RpcError("invalid_params", "expected the task as text (TOML) or as task, not both")
    try:
        if isinstance(text, str):
            return loads(text, source="task file", base_dir=Path(base))
        if text is not None:
            raise RpcError("invalid_params", "text must be a string")
        task = task_from_wire(wire_task, base_dir=Path(base))
    except TaskFileError as e:
        raise RpcError("invalid_task", str(e)) from None
    except LocalProtocolError as e:
        raise RpcError("invalid_task", f"task: {e}") from None
    for rel in archive_members(task):
        if not (task.base_dir / rel).exists():
            raise RpcError("invalid_task", f"{rel!r}: no such file or directory in {base}")
    return task


def _tar(task: TaskFile) -> bytes:
    """A deterministic tar of the task's files and local package directories, by their path
    relative to the task: sorted, no owners or times, modes 0644 or 0755 (executable bit kept),
    symbolic links that stay inside the task kept as links."""
    base = task.base_dir.resolve()
    entries: dict[str, tarfile.TarInfo] = {}
    contents: dict[str, bytes] = {}
    total = 0
    for member in archive_members(task):
        root = task.base_dir / member
        paths = (
            [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
        )
        for path in paths:
            rel = str(path.relative_to(task.base_dir))
            info = tarfile.TarInfo(rel)
            if path.is_symlink():
                target = os.readlink(path)
                if not (path.parent / target).resolve().is_relative_to(base):
                    raise TaskFileError(f"links outside {base}", source=str(path), key="files")
                info.type, info.linkname = tarfile.SYMTYPE, target
            elif path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif path.is_file():
                if not path.resolve().is_relative_to(base):
                    raise TaskFileError(f"outside {base}", source=str(path), key="files")
                data = path.read_bytes()
                total += len(data)
                if total > MAX_SHIPPED_BYTES:
                    raise TaskFileError(
                        f"the task's files exceed {MAX_SHIPPED_BYTES >> 20} MiB",
                        source="files",
                        key="files",
                    )
                info.size = len(data)
                info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                contents[rel] = data
            else:
                raise TaskFileError("not a file, directory or link", source=str(path), key="files")
            entries[rel] = info
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            body = contents.get(name)
            tar.addfile(entries[name], io.BytesIO(body) if body is not None else None)
    return out.getvalue()
