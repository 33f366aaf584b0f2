"""The protocol between a task owner's node and a scheduler (``/vmlend/tasks/1.0.0``).

One request per stream; the owner is the stream's authenticated peer ID, never a field. The
owner's node sends the task it parsed (:mod:`catalog.task_wire`); the files and local package
directories it names travel as one archive in the owner's chunk store (``files_blob``), which the
scheduler fetches from the owner before it accepts the task::

    Submit(task_id, task, files_blob?, providers)   -> Submitted(task_id, new)
    StatusRequest(task_id)                          -> TaskStatus
    WaitRequest(task_id, timeout)                   -> TaskStatus once finished (or at timeout)
    CancelRequest(task_id)                          -> TaskStatus
    ResultsRequest(task_id)                         -> TaskResults
    LogsRequest(task_id, follow)                    -> LogData... then LogEnd
    any request                                     -> Refused(code, message)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from catalog.task_wire import task_from_wire, task_to_wire
from catalog.taskfile import TaskFile
from node.errors import LocalProtocolError
from node.wire import WireLimits
from node.wire_fields import MAX_SECONDS, as_bytes, as_id, as_int, as_text
from node.wire_message import MessageSet, encode_record, record, tuple_of, wire

PROTOCOL_ID = "/vmlend/tasks/1.0.0"
MAX_PROVIDERS = 16
MAX_ADDR = 512
MAX_OUTPUT_INLINE = 1 << 20
MAX_REPLICAS = 16
MAX_LINES = 64
ID_SIZE = 32

WIRE_LIMITS = WireLimits(
    max_frame_size=2 * MAX_OUTPUT_INLINE + 256 * 1024,
    max_depth=6,
    max_items=1100,
    max_str=64 * 1024,
    max_bin=MAX_OUTPUT_INLINE,
)
# Where a task decoded from the wire points until its receiver places it in a directory of its
# own choosing: nothing can be read through it by mistake.
UNPLACED = Path("/nonexistent/vmlend-unplaced-task")


def _blob(value: object) -> bytes:
    return as_bytes("blob ID", value, ID_SIZE)


def _addr(value: object) -> str:
    return as_text("an address", value, MAX_ADDR)


def _line(value: object) -> str:
    return as_text("line", value)


def _optional_blob(value: object) -> bytes | None:
    return None if value is None else _blob(value)


def _worker(value: object) -> str | None:
    return None if value is None else as_id("worker", value)


def _task(raw: object) -> TaskFile:
    return task_from_wire(raw, base_dir=UNPLACED)


# ---- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Submit:
    TYPE: ClassVar[str] = "submit"
    task_id: str = field(metadata=wire(decode=lambda v: as_id("task_id", v)))
    task: TaskFile = field(metadata=wire(decode=_task, encode=task_to_wire))
    files_blob: bytes | None = field(
        default=None, metadata=wire(decode=_optional_blob, optional=True)
    )
    providers: tuple[str, ...] = field(
        default=(), metadata=wire(decode=tuple_of(_addr, limit=MAX_PROVIDERS))
    )

    def __post_init__(self) -> None:
        as_id("task_id", self.task_id)
        if not isinstance(self.task, TaskFile):
            raise LocalProtocolError("task must be a TaskFile")
        if self.files_blob is not None:
            _blob(self.files_blob)
        if len(self.providers) > MAX_PROVIDERS:
            raise LocalProtocolError(f"at most {MAX_PROVIDERS} providers")


@dataclass(frozen=True, slots=True, kw_only=True)
class _TaskRequest:
    task_id: str = field(metadata=wire(decode=lambda v: as_id("task_id", v)))

    def __post_init__(self) -> None:
        as_id("task_id", self.task_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest(_TaskRequest):
    TYPE: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest(_TaskRequest):
    TYPE: ClassVar[str] = "cancel"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultsRequest(_TaskRequest):
    TYPE: ClassVar[str] = "results"


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitRequest(_TaskRequest):
    TYPE: ClassVar[str] = "wait"
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        as_id("task_id", self.task_id)
        if type(self.timeout) not in (int, float) or not 0 <= self.timeout <= MAX_SECONDS:
            raise LocalProtocolError(f"timeout must be seconds in [0, {MAX_SECONDS}]")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogsRequest(_TaskRequest):
    TYPE: ClassVar[str] = "logs"
    follow: bool = False

    def __post_init__(self) -> None:
        as_id("task_id", self.task_id)
        if type(self.follow) is not bool:
            raise LocalProtocolError("follow must be a bool")


Request = Submit | StatusRequest | WaitRequest | CancelRequest | ResultsRequest | LogsRequest
REQUESTS: MessageSet[Request] = MessageSet(
    PROTOCOL_ID, Submit, StatusRequest, WaitRequest, CancelRequest, ResultsRequest, LogsRequest
)


# ---- replies -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Submitted:
    TYPE: ClassVar[str] = "submitted"
    task_id: str
    new: bool

    def __post_init__(self) -> None:
        as_id("task_id", self.task_id)
        if type(self.new) is not bool:
            raise LocalProtocolError("new must be a bool")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaView:
    index: int
    state: str
    worker: str | None = field(metadata=wire(decode=_worker))
    attempts: int
    fetched: int | None = field(
        default=None, metadata=wire(decode=lambda v: _fetched(v), optional=True)
    )
    """Bytes of its image its worker has fetched so far, while that worker prepares it."""

    def __post_init__(self) -> None:
        as_int("index", self.index, 0, MAX_REPLICAS - 1)
        as_text("state", self.state)
        _worker(self.worker)
        as_int("attempts", self.attempts, 0, 2**31 - 1)
        if self.fetched is not None:
            _fetched(self.fetched)


def _fetched(value: object) -> int:
    return as_int("fetched", value, 0, 1 << 40)


def _time(value: object, name: str = "time") -> float | None:
    """A wall-clock time in Unix seconds, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2**40:
        raise LocalProtocolError(f"{name} must be a time in Unix seconds")
    return float(value)


def _time_field(name: str) -> Any:
    def decode(value: object) -> float | None:
        return _time(value, name)

    return field(default=None, metadata=wire(decode=decode, optional=True))


def _lines(limit: int = MAX_LINES) -> Any:
    return tuple_of(_line, limit=limit)


def _workers(value: object) -> tuple[str, ...]:
    return tuple_of(lambda v: as_id("worker", v), limit=MAX_REPLICAS * 8)(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatus:
    """What the owner may know of a task; ``waiting`` explains a task not (fully) running."""

    TYPE: ClassVar[str] = "status"
    task_id: str
    state: str
    verdict: str | None
    reason: str
    finished: bool
    exit_code: int | None
    replicas: tuple[ReplicaView, ...] = field(
        metadata=wire(decode=tuple_of(record(ReplicaView), limit=MAX_REPLICAS))
    )
    results: int
    reported_by: tuple[str, ...] = field(metadata=wire(decode=_workers))
    dissenters: tuple[str, ...] = field(metadata=wire(decode=_workers))
    waiting: tuple[str, ...] = field(metadata=wire(decode=_lines()))
    # Wall-clock times at the scheduler (Unix seconds): submitted, a replica running since
    # (the earliest running now), finished.
    submitted_at: float | None = _time_field("submitted_at")
    running_since: float | None = _time_field("running_since")
    finished_at: float | None = _time_field("finished_at")

    def __post_init__(self) -> None:
        as_id("task_id", self.task_id)
        for name in ("submitted_at", "running_since", "finished_at"):
            _time(getattr(self, name), name)
        as_text("state", self.state)
        if self.verdict is not None:
            as_text("verdict", self.verdict)
        if type(self.reason) is not str or len(self.reason) > 4096:
            raise LocalProtocolError("reason must be a str of <= 4096 characters")
        if type(self.finished) is not bool:
            raise LocalProtocolError("finished must be a bool")
        if self.exit_code is not None:
            as_int("exit_code", self.exit_code, -(2**31), 2**31 - 1)
        as_int("results", self.results, 0, 2**31 - 1)

    def to_rpc(self) -> dict[str, Any]:
        """The map the local RPC answers with (the owner's scripts read these keys)."""
        return encode_record(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskResults:
    """The agreed result: output inline (its last ``MAX_OUTPUT_INLINE`` bytes, exactly the bytes
    whose digests the quorum agreed on), the ``/out`` archive as a blob to fetch from
    ``providers`` (its ID verifies its bytes). Without an agreement: no archive, and the output
    is the partial live output, if any (``partial``)."""

    TYPE: ClassVar[str] = "results"
    status: TaskStatus = field(metadata=wire(decode=record(TaskStatus)))
    stdout: bytes
    stderr: bytes
    archive_blob: bytes | None = field(default=None, metadata=wire(decode=_optional_blob))
    providers: tuple[str, ...] = field(
        default=(), metadata=wire(decode=tuple_of(_addr, limit=MAX_PROVIDERS))
    )
    # No agreed result (cancelled, failed, timed out): stdout and stderr are the live output the
    # scheduler still holds of its last run, as far as it got.
    partial: bool = field(default=False, metadata=wire(optional=True))

    def __post_init__(self) -> None:
        if type(self.partial) is not bool:
            raise LocalProtocolError("partial must be a bool")
        for name in ("stdout", "stderr"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) > MAX_OUTPUT_INLINE:
                raise LocalProtocolError(f"{name} must be <= {MAX_OUTPUT_INLINE} bytes")
        if self.archive_blob is not None:
            _blob(self.archive_blob)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogData:
    TYPE: ClassVar[str] = "log"
    stream: str
    data: bytes

    def __post_init__(self) -> None:
        if self.stream not in ("stdout", "stderr"):
            raise LocalProtocolError("stream must be stdout or stderr")
        if type(self.data) is not bytes or len(self.data) > MAX_OUTPUT_INLINE:
            raise LocalProtocolError(f"data must be <= {MAX_OUTPUT_INLINE} bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogEnd:
    TYPE: ClassVar[str] = "log_end"
    state: str

    def __post_init__(self) -> None:
        as_text("state", self.state)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """The request was refused; ``code`` is for programs, ``message`` for people."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str

    def __post_init__(self) -> None:
        as_text("code", self.code)
        if type(self.message) is not str or len(self.message) > 4096:
            raise LocalProtocolError("message must be a str of <= 4096 characters")


Reply = Submitted | TaskStatus | TaskResults | LogData | LogEnd | Refused
REPLIES: MessageSet[Reply] = MessageSet(
    PROTOCOL_ID, Submitted, TaskStatus, TaskResults, LogData, LogEnd, Refused
)
