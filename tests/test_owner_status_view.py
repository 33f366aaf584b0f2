"""``vmlend status`` for people (issue 18): a header, ages and runtimes, then the details."""

from __future__ import annotations

import pytest

from owner_role.status_view import ago, span, status_lines

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0 s"), (42.9, "42 s"), (60, "1 min"), (3599, "59 min"), (3600, "1 h"),
     (3600 + 5 * 60, "1 h 5 min"), (86400 * 4 + 5, "4 d")],
)  # fmt: skip
def test_a_span_is_shown_to_the_unit_that_matters(seconds: float, shown: str) -> None:
    assert span(seconds) == shown


def test_an_age_is_a_span_ago_and_a_clock_behind_ours_is_just_now() -> None:
    assert ago(0.4) == "just now"
    assert ago(-3) == "just now"  # the scheduler's clock ahead of ours
    assert ago(125) == "2 min ago"


def status(task_id: str, state: str, **more: object) -> dict[str, object]:
    return {"task_id": task_id, "state": state, "exit_code": None, "reason": "",
            "replicas": [], "reported_by": [], "waiting": [], **more}  # fmt: skip


def test_tasks_are_rows_under_a_header_with_their_details_below() -> None:
    lines = status_lines(
        [
            status("render-3fa9c01b2e", "running", submitted_at=NOW - 130,
                   running_since=NOW - 41,
                   replicas=[{"index": 0, "state": "running", "worker": "12D3w", "attempts": 1}]),
            status("backup-9c1e0d2a7f", "succeeded", exit_code=0, submitted_at=NOW - 7200,
                   finished_at=NOW - 7200 + 75, reported_by=["12D3w"]),
            status("queued-1", "active", submitted_at=NOW - 5,
                   waiting=["no worker offers 8 GiB memory"]),
            status("old-node", "active"),  # a scheduler that does not send times
        ],
        NOW,
    )  # fmt: skip
    assert lines == [
        "TASK ID            STATE      EXIT  SUBMITTED  RUNTIME",
        "render-3fa9c01b2e  running    -     2 min ago  for 41 s",
        "  replica 0: running 12D3w (attempts 1)",
        "backup-9c1e0d2a7f  succeeded  0     2 h ago    took 1 min",
        "  result from 12D3w",
        "queued-1           active     -     5 s ago    -",
        "  waiting: no worker offers 8 GiB memory",
        "old-node           active     -     -          -",
    ]


def test_no_task_says_how_to_make_one() -> None:
    assert status_lines([], NOW) == [
        "no tasks: submit one with 'vmlend submit TASK.toml' or 'vmlend run -- CMD'"
    ]
