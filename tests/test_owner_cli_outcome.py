"""How the owner's commands put a task's end in words (issue 18, item 7): never "exit code None"."""

from __future__ import annotations

from typing import Any

import pytest

from owner_role.cli import outcome


def _status(state: str, *, code: int | None = None, reason: str = "", attempts: int = 0) -> Any:
    replicas = [{"index": 0, "state": "failed", "worker": None, "attempts": attempts}]
    return {"task_id": "t-1", "state": state, "exit_code": code, "reason": reason,
            "replicas": replicas}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (_status("succeeded", code=0), "succeeded (exit code 0)"),
        (_status("succeeded", code=7), "succeeded (exit code 7)"),
        (_status("cancelled", reason="cancelled by owner"), "cancelled"),
        (_status("failed", reason="max runtime exceeded", attempts=1),
         "timed out: max runtime exceeded"),
        (_status("failed", reason="no image 'x'"), "never ran: no image 'x'"),
        (_status("failed"), "never ran: no worker took it"),
        (_status("failed", reason="lease expired; gave up", attempts=3),
         "failed: lease expired; gave up"),
        (_status("active"), "active"),
    ],
)  # fmt: skip
def test_outcome_in_words(status: dict[str, Any], words: str) -> None:
    assert outcome(status) == words
    assert "None" not in outcome(status)
