"""The times in a task's status (issue 18: age and runtime in ``vmlend status``) as a stranger
scheduler may send them: optional, and refused unless they are times."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from catalog.owner_protocol import REPLIES, TaskStatus
from node.errors import RemoteProtocolError

NOW = 1_800_000_000.0


def status(**times: float | None) -> TaskStatus:
    return TaskStatus(
        task_id="t-1", state="active", verdict=None, reason="", finished=False, exit_code=None,
        replicas=(), results=0, reported_by=(), dissenters=(), waiting=(), **times,
    )  # fmt: skip


def test_times_travel_and_a_scheduler_without_them_is_understood() -> None:
    sent = status(submitted_at=NOW, running_since=NOW + 3, finished_at=None)
    assert REPLIES.decode(REPLIES.encode(sent)) == sent
    old: dict[str, Any] = REPLIES.encode(status())
    assert "submitted_at" not in old  # left out when unknown
    assert REPLIES.decode(old) == status()


@pytest.mark.parametrize("bad", ["yesterday", -1.0, math.nan, math.inf, 2.0**41, True])
def test_a_time_that_is_no_time_is_refused(bad: object) -> None:
    frame: dict[str, Any] = REPLIES.encode(status(submitted_at=NOW))
    frame["submitted_at"] = bad
    with pytest.raises(RemoteProtocolError, match="submitted_at"):
        REPLIES.decode(frame)


@pytest.mark.parametrize("bad", [-1, 1 << 41, True, 1.5, "12MiB"])
def test_bytes_fetched_that_are_no_count_are_refused(bad: object) -> None:
    from catalog.owner_protocol import ReplicaView

    view = ReplicaView(index=0, state="leased", worker=None, attempts=1, fetched=5 << 20)
    sent = dataclasses.replace(status(), replicas=(view,))
    assert REPLIES.decode(REPLIES.encode(sent)) == sent
    frame: dict[str, Any] = REPLIES.encode(sent)
    frame["replicas"][0]["fetched"] = bad
    with pytest.raises(RemoteProtocolError, match="fetched"):
        REPLIES.decode(frame)
