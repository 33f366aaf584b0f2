"""The scheduler's live-log window (:mod:`scheduler_role.live_logs`): what a worker can make it
hold, and what a follower is told when output was cut or skipped."""

from __future__ import annotations

from catalog.dispatch import MAX_LOG_CHUNK, LeaseKey
from scheduler_role.live_logs import (
    CUT_NOTE,
    MAX_LEASE_LOG,
    MAX_LOG_BYTES,
    MAX_LOG_SEGMENTS,
    MAX_TASK_LOG,
    LogBuffer,
    LogCursor,
)


def _text(pieces: list[tuple[str, bytes]], stream: str | None = None) -> bytes:
    return b"".join(d for s, d in pieces if stream is None or s == stream)


def test_log_buffer_follows_the_newest_attempt_of_one_replica() -> None:
    buffer = LogBuffer()
    first, other, retry = LeaseKey("t", 0, 1), LeaseKey("t", 1, 1), LeaseKey("t", 0, 2)
    assert buffer.add(first, "stdout", b"a")
    assert not buffer.add(other, "stdout", b"ignored: another replica")
    pieces, cursor = buffer.read(LogCursor())
    assert pieces == [("stdout", b"a")]
    changed = buffer.changed
    buffer.add(retry, "stderr", b"b")
    assert changed.is_set()
    pieces, cursor = buffer.read(cursor)  # the new attempt starts over
    assert (buffer.source, pieces) == (retry, [("stderr", b"b")])
    assert not buffer.add(first, "stdout", b"late word from the lapsed attempt")
    assert buffer.read(cursor)[0] == []


def test_a_frame_past_the_lease_budget_is_dropped_counted_and_noted_once() -> None:
    buffer = LogBuffer()
    lease = LeaseKey("t", 0, 1)
    frame = b"x" * MAX_LOG_CHUNK
    taken = 0
    for _ in range(2 * MAX_LEASE_LOG // MAX_LOG_CHUNK):
        taken += len(frame) if buffer.add(lease, "stdout", frame) else 0
    assert taken == buffer.accepted <= MAX_LEASE_LOG
    assert buffer.dropped == 2 * MAX_LEASE_LOG // MAX_LOG_CHUNK * MAX_LOG_CHUNK - taken > 0
    assert buffer.size <= MAX_LOG_BYTES
    pieces, _ = buffer.read(LogCursor(lease))
    assert _text(pieces, "stderr").count(CUT_NOTE) == 1
    assert sum(len(d) for _, d in pieces) <= MAX_LOG_BYTES + 1024  # the skipped note on top


def test_a_task_takes_at_most_its_budget_over_all_attempts() -> None:
    buffer = LogBuffer()
    frame = b"y" * MAX_LOG_CHUNK
    for attempt in range(1, 10):
        lease = LeaseKey("t", 0, attempt)
        while buffer.add(lease, "stdout", frame):
            pass
    assert buffer.accepted_task <= MAX_TASK_LOG
    assert buffer.accepted == 0  # the last attempts got nothing in


def test_one_byte_frames_are_joined_and_the_window_stays_bounded() -> None:
    buffer = LogBuffer()
    lease = LeaseKey("t", 0, 1)
    for n in range(200_000):  # alternating streams defeat joining: the piece count bounds them
        buffer.add(lease, "stdout" if n % 2 else "stderr", b"z")
    assert len(buffer._segments) <= MAX_LOG_SEGMENTS
    for _ in range(3 * MAX_LOG_BYTES // 4096):
        buffer.add(lease, "stdout", b"w" * 4096)
    assert buffer.size <= MAX_LOG_BYTES
    assert len(buffer._segments) <= MAX_LOG_SEGMENTS


def test_a_follower_behind_the_window_is_told_what_it_missed() -> None:
    buffer = LogBuffer()
    lease = LeaseKey("t", 0, 1)
    buffer.add(lease, "stdout", b"first\n")
    pieces, behind = buffer.read(LogCursor(lease))
    assert _text(pieces) == b"first\n"
    for _ in range(2 * MAX_LOG_BYTES // MAX_LOG_CHUNK):
        buffer.add(lease, "stdout", b"m" * MAX_LOG_CHUNK)
    pieces, caught_up = buffer.read(behind)
    assert pieces[0][0] == "stderr"
    assert b"bytes of live output skipped" in pieces[0][1]
    assert sum(len(d) for _, d in pieces[1:]) == MAX_LOG_BYTES
    assert all(len(d) <= MAX_LOG_CHUNK for _, d in pieces)
    buffer.add(lease, "stdout", b"last\n")
    assert buffer.read(caught_up)[0] == [("stdout", b"last\n")]
