"""The chaos report worked out from what a run saw, without a run."""

from __future__ import annotations

import pytest

from tests.chaos.accounting import FaultRecord, Line, TaskOutcome, account

S = "12D3KooWSched"
PEERS = {"w0": "12D3KooWw0", "w1": "12D3KooWw1"}


def grant(at: float, node: str, lease: str) -> Line:
    return Line(
        at, node, f"2026-12-07T10:00:00.000Z vmlend.worker.agent INFO lease {lease} granted by {S}"
    )


def run(at: float, node: str, lease: str, domain: str) -> Line:
    return Line(at, node, f"... INFO lease {lease} runs in {domain}")


def done(task: str, *, by: str = "w1", results: int = 1, state: str = "succeeded") -> TaskOutcome:
    status = {"state": state, "results": results, "reported_by": [PEERS[by]]}
    return TaskOutcome(task, b"mine\n", status, b"mine\n" if state == "succeeded" else None)


def test_a_killed_run_and_its_rerun_elsewhere() -> None:
    lines = [
        grant(1.0, "w0", "t1/0#1"),
        run(2.0, "w0", "t1/0#1", "vmlend-a"),
        grant(9.0, "w1", "t1/0#2"),
        run(10.0, "w1", "t1/0#2", "vmlend-b"),
        grant(12.0, "w0", "t2/0#1"),
    ]
    domains = {"vmlend-a": (2.0, 5.0), "vmlend-b": (10.0, 14.0)}
    fault = FaultRecord("kill", "w0", 3.0, healed_at=8.0, ready_at=11.0, task_id="t1",
                        attempt=1, requeued_at=8.5)  # fmt: skip
    report = account(lines, domains, [fault], [done("t1")], PEERS, [], started_at=1.0)
    assert report.succeeded == 1
    assert report.vm_runs == 2
    assert report.re_runs == 1
    assert report.vm_seconds == pytest.approx(7.0)
    assert report.wasted_vm_seconds == pytest.approx(3.0)  # the killed run's
    [f] = report.faults
    assert f.struck_at == 2.0
    assert f.held_s == 5.0
    assert f.requeued_after_s == 5.5
    assert f.rerun_elsewhere_after_s == 7.0
    assert f.serving_again_after_s == 1.0  # ready at 11, its next lease at 12


def test_failed_lost_wrong_and_duplicated_tasks_are_told_apart() -> None:
    lines = [
        run(1.0, "w1", f"{t}/0#1", f"vmlend-{t}") for t in ("ok", "bad", "gone", "wrong", "twice")
    ]
    domains = {f"vmlend-{t}": (1.0, 2.0) for t in ("ok", "bad", "gone", "wrong", "twice")}
    outcomes = [
        done("ok"),
        done("bad", state="failed"),
        TaskOutcome("gone", b"x", None, None),
        TaskOutcome("wrong", b"mine\n", {"state": "succeeded", "results": 1}, b"other\n"),
        done("twice", results=2),
    ]
    report = account(lines, domains, [], outcomes, PEERS, ["vmlend-left"])
    assert report.succeeded == 2  # "ok" and "twice"
    assert report.failed == ["bad"]
    assert report.lost == ["gone"]
    assert report.wrong_output == ["wrong"]
    assert report.duplicated == ["twice"]
    assert report.orphan_vms == ["vmlend-left"]
    # Only the runs whose result counted were useful: every other VM-second was wasted.
    assert report.wasted_vm_seconds == pytest.approx(3.0)


def test_a_schedulers_return_is_timed_to_the_next_lease_anywhere() -> None:
    lines = [grant(1.0, "w0", "t1/0#1"), grant(14.5, "w1", "t2/0#1")]
    fault = FaultRecord("scheduler-restart", "sched", 2.0, healed_at=12.0, ready_at=13.0)
    [f] = account(lines, {}, [fault], [], PEERS, []).faults
    assert f.first_lease_after_return_s == 1.5
    assert f.serving_again_after_s is None
    assert f.rerun_elsewhere_after_s is None


def test_lines_of_other_tasks_and_other_logs_are_ignored() -> None:
    lines = [
        Line(1.0, "w0", "lease t9/0#1 runs in vmlend-z"),  # a task this run did not submit
        Line(1.0, "w0", "scheduler said: lease granted by nobody"),
    ]
    report = account(lines, {"vmlend-z": (1.0, 9.0)}, [], [done("t1")], PEERS, [])
    assert report.vm_runs == 0
    assert report.vm_seconds == 0.0
