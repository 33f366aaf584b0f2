"""What of a lease's output a worker streams live to its scheduler, sans-IO.

A guest may write as fast as the host can read (762 MiB in 30 s was seen). The scheduler shows
live output to the owner; the result keeps the last ``MAX_RESULT_OUTPUT`` of each stream anyway,
so live output is a courtesy with a budget: at most ``budget`` bytes per lease, at most ``rate``
bytes a second on average (``burst`` at once). Past the rate, output is dropped until tokens
return; past the budget, nothing more of that lease is streamed. Either way the stream says so
(on stderr, lines starting ``vmlend:``), and :meth:`LiveLog.close` ends it with the count of
bytes dropped, so nothing is dropped silently. The notes take at most ``LIVE_LOG_NOTE_ROOM``
bytes past the budget, which is what the scheduler allows for them.
"""

from __future__ import annotations

from catalog.dispatch import (
    LIVE_LOG_BURST,
    LIVE_LOG_NOTE_ROOM,
    LIVE_LOG_RATE,
    MAX_LIVE_LOG,
    MAX_LOG_CHUNK,
    MAX_RESULT_OUTPUT,
)
from worker_role.token_bucket import TokenBucket
from worker_role.vm.interface import OutputChunk

CUT_NOTE = b"vmlend: live output cut"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


class LiveLog:
    """One lease's live output: feed it what the guest wrote, send what it gives back."""

    def __init__(
        self,
        *,
        now: float,
        budget: int = MAX_LIVE_LOG,
        rate: int = LIVE_LOG_RATE,
        burst: int = LIVE_LOG_BURST,
    ) -> None:
        self.budget = budget
        self.rate = rate
        self._bucket = TokenBucket(rate, burst, now=now)
        self.sent = 0
        """Bytes given back to send, notes included."""
        self.dropped = {"stdout": 0, "stderr": 0}
        self._gap = 0  # dropped for the rate since the last note
        self._cut = False
        self._notes = 0  # note bytes sent past the budget

    def admit(self, stream: str, data: bytes, now: float) -> list[OutputChunk]:
        """What to send of ``data`` (from ``stream``), in order, in frames of at most
        ``MAX_LOG_CHUNK`` bytes; the rest is counted as dropped."""
        if self._cut or not data:
            self.dropped[stream] += len(data)
            return []
        out: list[OutputChunk] = []
        gap_note = b""
        if self._gap:
            note = (
                f"\nvmlend: {self._gap} bytes of live output dropped (over {_mib(self.rate)}/s)\n"
            )
            gap_note = note.encode()
        if self._bucket.tokens(now) < len(data) + len(gap_note):
            self._gap += len(data)
            self.dropped[stream] += len(data)
            return []
        room = self.budget - self.sent
        if len(gap_note) + len(data) > room:
            fit = max(0, room - len(gap_note))
            if fit and gap_note:
                out.append(("stderr", gap_note))
            out += _frames(stream, data[:fit])
            self.dropped[stream] += len(data) - fit
            self._cut = True
            self._spend(out, now)
            cut = (
                f"\n{CUT_NOTE.decode()} after {_mib(self.budget)}: the rest of this attempt's "
                f"output is not streamed (its result keeps the last {_mib(MAX_RESULT_OUTPUT)} "
                "of stdout and of stderr)\n"
            )
            out.append(self._note(cut.encode()))
            return out
        if gap_note:
            out.append(("stderr", gap_note))
            self._gap = 0
        out += _frames(stream, data)
        self._spend(out, now)
        return out

    def _spend(self, out: list[OutputChunk], now: float) -> None:
        spent = sum(len(d) for _, d in out)
        self._bucket.reserve(spent, now)
        self.sent += spent

    def close(self) -> list[OutputChunk]:
        """The last frame: how much was dropped, if anything was."""
        total = sum(self.dropped.values())
        if not total:
            return []
        note = (
            f"\n{CUT_NOTE.decode()}: {total} bytes dropped (stdout {self.dropped['stdout']}, "
            f"stderr {self.dropped['stderr']})\n"
        )
        return [self._note(note.encode())]

    def _note(self, note: bytes) -> OutputChunk:
        # Two notes at most use the room (the cut and the close); each is far under half of it.
        assert self._notes + len(note) <= LIVE_LOG_NOTE_ROOM
        self._notes += len(note)
        self.sent += len(note)
        return ("stderr", note)


def _frames(stream: str, data: bytes) -> list[OutputChunk]:
    return [(stream, data[i : i + MAX_LOG_CHUNK]) for i in range(0, len(data), MAX_LOG_CHUNK)]
