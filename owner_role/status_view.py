"""``vmlend status`` for people: one row per task under a header, as ``docker ps`` shows
containers, then what each task's replicas do and what it waits for.

Times are the scheduler's wall clock against ours: a clock that is off shifts the ages, never
the order. Pure functions of the status maps and ``now``, so they are tested on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HEADER = ("TASK ID", "STATE", "EXIT", "SUBMITTED", "RUNTIME")


def ago(seconds: float) -> str:
    """How long ago, to the unit a person reads: ``"just now"``, ``"42 s ago"``, ``"3 min ago"``."""
    if seconds < 1:
        return "just now"
    return f"{span(seconds)} ago"


def span(seconds: float) -> str:
    """A duration to the unit that matters: ``"42 s"``, ``"3 min"``, ``"2 h 5 min"``, ``"4 d"``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        hours, minutes = divmod(s // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{s // 86400} d"


def _runtime(status: Mapping[str, Any], now: float) -> str:
    """Running: for how long; finished: how long it took from submission; else nothing."""
    since, finished = status.get("running_since"), status.get("finished_at")
    submitted = status.get("submitted_at")
    if finished is not None and submitted is not None:
        return f"took {span(finished - submitted)}"
    if since is not None:
        return f"for {span(now - since)}"
    return "-"


def row(status: Mapping[str, Any], now: float) -> tuple[str, str, str, str, str]:
    code = status.get("exit_code")
    submitted = status.get("submitted_at")
    return (
        str(status["task_id"]),
        str(status["state"]),
        "-" if code is None else str(code),
        "-" if submitted is None else ago(now - submitted),
        _runtime(status, now),
    )


def details(status: Mapping[str, Any]) -> list[str]:
    """The lines under a task's row: its reason, replicas, results and what it waits for."""
    lines = []
    if status.get("reason"):
        lines.append(f"  {status['reason']}")
    for replica in status.get("replicas", []):
        worker = replica["worker"] or "-"
        lines.append(
            f"  replica {replica['index']}: {replica['state']} {worker}"
            f" (attempts {replica['attempts']})"
        )
    lines += [f"  result from {worker}" for worker in status.get("reported_by", [])]
    lines += [f"  waiting: {reason}" for reason in status.get("waiting", [])]
    return lines


def status_lines(statuses: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """The header, then each task's row (columns as wide as their widest cell) and details."""
    if not statuses:
        return ["no tasks: submit one with 'vmlend submit TASK.toml' or 'vmlend run -- CMD'"]
    rows = [row(s, now) for s in statuses]
    widths = [max(len(c) for c in column) for column in zip(HEADER, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(HEADER)]
    for status, cells in zip(statuses, rows, strict=True):
        out.append(line(cells))
        out += details(status)
    return out
