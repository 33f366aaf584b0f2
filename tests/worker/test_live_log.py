"""What a worker streams live of a lease's output (:mod:`worker_role.live_log`): the budget, the
rate, and the notes that say what was dropped."""

from __future__ import annotations

from catalog.dispatch import LIVE_LOG_NOTE_ROOM, MAX_LIVE_LOG, MAX_LOG_CHUNK
from worker_role.live_log import CUT_NOTE, LiveLog
from worker_role.vm.interface import OutputChunk

MIB = 1 << 20


def _feed(live: LiveLog, total: int, *, rate: float, stream: str = "stdout") -> list[OutputChunk]:
    """``total`` bytes written at ``rate`` bytes/s in 64 KiB reads."""
    out: list[OutputChunk] = []
    now = 0.0
    for start in range(0, total, 65536):
        size = min(65536, total - start)
        out += live.admit(stream, b"o" * size, now)
        now += size / rate
    return out


def _size(chunks: list[OutputChunk]) -> int:
    return sum(len(d) for _, d in chunks)


def test_a_flood_is_cut_at_the_budget_and_the_stream_says_how_much_was_dropped() -> None:
    live = LiveLog(now=0.0, rate=1 << 40, burst=1 << 40)  # no rate limit: only the budget
    out = _feed(live, 200 * MIB, rate=25 * MIB)
    out += live.close()
    assert _size(out) <= MAX_LIVE_LOG + LIVE_LOG_NOTE_ROOM
    assert _size([c for c in out if c[0] == "stdout"]) == MAX_LIVE_LOG
    notes = b"".join(d for s, d in out if s == "stderr")
    assert notes.count(CUT_NOTE) == 2  # where it was cut, and at the end with the count
    dropped = 200 * MIB - MAX_LIVE_LOG
    assert f"{dropped} bytes dropped (stdout {dropped}, stderr 0)".encode() in notes
    assert all(len(d) <= MAX_LOG_CHUNK for _, d in out)


def test_output_over_the_rate_is_dropped_with_a_note_at_each_gap() -> None:
    live = LiveLog(now=0.0, rate=MIB, burst=2 * MIB)
    out = _feed(live, 6 * MIB, rate=10 * MIB)  # 0.6 s of writing: about 2.6 MiB may go
    sent = _size([c for c in out if c[0] == "stdout"])
    assert 2 * MIB <= sent <= 2 * MIB + MIB
    # Later, slower output goes through again after a note saying how much was dropped.
    later = live.admit("stdout", b"after the gap\n", 100.0)
    assert later[0][0] == "stderr"
    assert b"bytes of live output dropped (over 1 MiB/s)" in later[0][1]
    assert later[1] == ("stdout", b"after the gap\n")
    assert f"{6 * MIB - sent} bytes dropped".encode() in live.close()[0][1]


def test_honest_output_passes_whole_and_closes_without_a_note() -> None:
    live = LiveLog(now=0.0)
    out = live.admit("stdout", b"hello\n", 0.0) + live.admit("stderr", b"warn\n", 0.1)
    assert out == [("stdout", b"hello\n"), ("stderr", b"warn\n")]
    assert live.close() == []
