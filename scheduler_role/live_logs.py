"""The live output of a task's running replica, as the scheduler keeps it for owners following it.

Sans-IO. A worker streams at most ``MAX_LIVE_LOG`` bytes per lease plus a little room for its
notes (``worker_role.live_log``); :class:`LogBuffer` takes no more than that per lease, and no
more than ``MAX_TASK_LOG`` per task over all its attempts: a frame past either is dropped whole
and counted, never buffered, and the log says once that output was cut here. What is kept is a
window of the last ``MAX_LOG_BYTES`` in at most ``MAX_LOG_SEGMENTS`` pieces (small frames are
joined, so a flood of one-byte frames costs no more memory than one large one). A follower
reads from a :class:`LogCursor`; one that fell behind the window is told how much it missed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio

from catalog.dispatch import LIVE_LOG_NOTE_ROOM, MAX_LIVE_LOG, MAX_LOG_CHUNK, LeaseKey

MAX_LOG_BYTES = 1 << 20  # kept per task for followers; the result holds the tail anyway
MAX_LOG_SEGMENTS = 1024
MAX_LEASE_LOG = MAX_LIVE_LOG + LIVE_LOG_NOTE_ROOM  # taken per lease: what an honest worker sends
MAX_TASK_LOG = 4 * MAX_LEASE_LOG  # taken per task, over all its attempts
CUT_NOTE = b"vmlend: live output cut by the scheduler"


@dataclass(frozen=True, slots=True)
class LogCursor:
    """Where a follower is: in which lease's output, at which byte of it."""

    source: LeaseKey | None = None
    offset: int = 0
    read_any: bool = False
    """Whether anything was read at all (a follower that got nothing shows the result)."""


@dataclass(slots=True)
class _Segment:
    offset: int
    stream: str
    data: bytearray


class LogBuffer:
    """The live output of one task's current replica run (its latest attempt)."""

    def __init__(self) -> None:
        self.source: LeaseKey | None = None
        self._segments: deque[_Segment] = deque()
        self.start = 0  # offset of the first byte kept
        self.end = 0  # offset after the last byte taken
        self.accepted = 0  # guest bytes taken from this lease
        self.accepted_task = 0  # ... from every lease of this task
        self.dropped = 0  # bytes of frames dropped for this lease's budget or the task's
        self._cut_noted = False
        self.changed = trio.Event()

    def add(self, lease: LeaseKey, stream: str, data: bytes) -> bool:
        """Take a frame the holder of ``lease`` sent; False if it was not kept (another lease's,
        or past a budget: then it is counted in :attr:`dropped`)."""
        if self.source is None or (
            lease.replica == self.source.replica and lease.attempt > self.source.attempt
        ):
            self._start_over(lease)
        if lease != self.source:
            return False
        left = min(MAX_LEASE_LOG - self.accepted, MAX_TASK_LOG - self.accepted_task)
        if len(data) > left:
            self.dropped += len(data)
            if not self._cut_noted:
                self._cut_noted = True
                note = (
                    f"\n{CUT_NOTE.decode()}: {lease} sent more than the "
                    f"{MAX_LEASE_LOG} bytes a lease may stream (or its task more than "
                    f"{MAX_TASK_LOG}); the rest is dropped\n"
                )
                self._append("stderr", note.encode())
                self.pulse()
            return False
        self.accepted += len(data)
        self.accepted_task += len(data)
        self._append(stream, data)
        self.pulse()
        return True

    def read(self, cursor: LogCursor) -> tuple[list[tuple[str, bytes]], LogCursor]:
        """What is new for a follower at ``cursor`` (each piece at most ``MAX_LOG_CHUNK``
        bytes), and where it is then. A new attempt starts over from its first byte."""
        offset = cursor.offset if cursor.source == self.source else 0
        pieces: list[tuple[str, bytes]] = []
        if offset < self.start:
            skipped = (
                f"\nvmlend: {self.start - offset} bytes of live output skipped (the scheduler "
                f"keeps the last {MAX_LOG_BYTES} bytes)\n"
            )
            pieces.append(("stderr", skipped.encode()))
            offset = self.start
        for segment in self._segments:
            if segment.offset + len(segment.data) > offset:
                pieces.append((segment.stream, bytes(segment.data[offset - segment.offset :])))
                offset = segment.offset + len(segment.data)
        return pieces, LogCursor(self.source, self.end, cursor.read_any or bool(pieces))

    def pulse(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @property
    def size(self) -> int:
        """Bytes kept."""
        return self.end - self.start

    def _start_over(self, lease: LeaseKey) -> None:
        self.source = lease
        self._segments.clear()
        self.start = self.end = self.accepted = self.dropped = 0
        self._cut_noted = False

    def _append(self, stream: str, data: bytes) -> None:
        last = self._segments[-1] if self._segments else None
        joined = last is not None and len(last.data) + len(data) <= MAX_LOG_CHUNK
        if last is not None and joined and last.stream == stream:
            last.data += data
        else:
            self._segments.append(_Segment(self.end, stream, bytearray(data)))
        self.end += len(data)
        while self.size > MAX_LOG_BYTES or len(self._segments) > MAX_LOG_SEGMENTS:
            first = self._segments[0]
            cut = min(len(first.data), self.size - MAX_LOG_BYTES)
            if len(self._segments) > MAX_LOG_SEGMENTS or cut >= len(first.data):
                self._segments.popleft()
                self.start = first.offset + len(first.data)
            else:
                del first.data[:cut]
                first.offset += cut
                self.start = first.offset
