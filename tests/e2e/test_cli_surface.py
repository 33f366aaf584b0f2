"""The owner's command line as scripts and people use it, through the real ``vmlend`` binary
(issue 18, item 9): ``--json`` on submit, logs, wait, results and cancel; RPC error codes only in
JSON; ``results`` without ``-o``; ``-v`` after the command; a task named by the start of its ID.
No worker runs: no VM is needed."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path

import pytest
import trio

from node.localnet import local_network, vmlend_command
from tests.e2e.test_cli_results import QUEUED, ROLES, vmlend

pytestmark = pytest.mark.e2e


async def test_json_everywhere_and_results_without_o(tmp_path: Path) -> None:
    async with local_network(tmp_path, 2, roles=ROLES) as (_, owner):
        (tmp_path / "task.toml").write_text(QUEUED)
        with trio.fail_after(60):
            await owner.call("schedulers.wait", {"count": 1, "timeout": 60})
        code, out, err = await vmlend(owner, "submit", "--json", str(tmp_path / "task.toml"))
        assert code == 0, err
        submitted = json.loads(out)
        task_id = submitted["task_id"]
        assert submitted["scheduler"]

        code, out, err = await vmlend(owner, "cancel", "--json", task_id)
        assert code == 0, err
        assert json.loads(out)["state"] == "cancelled"

        code, out, err = await vmlend(owner, "wait", "--json", task_id)
        assert code == 1, err
        waited = json.loads(out)
        assert (waited["task_id"], waited["state"], waited["exit_code"]) == (
            task_id,
            "cancelled",
            None,
        )
        # One time format for people and scripts alike (RFC 3339, UTC).
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", waited["submitted_at"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", waited["finished_at"])

        code, out, err = await vmlend(owner, "logs", "--json", task_id)
        assert code == 1, err  # cancelled before any output
        assert json.loads(out) | {"state": ""} == {
            "task_id": task_id, "state": "", "stdout": "", "stderr": "",
        }  # fmt: skip
        code, _, err = await vmlend(owner, "logs", "--json", "-f", task_id)
        assert (code, err) == (2, "vmlend logs: --json does not go with --follow\n")

        # results without -o: a directory named after the task, in the current one.
        here = tmp_path / "here"
        here.mkdir()
        code, out, err = await vmlend(owner, "results", "--json", task_id, cwd=here)
        assert code == 1, err
        found = json.loads(out)
        assert found["out"] == str(here / task_id)
        assert found["files"] == [str(here / task_id / "stdout"), str(here / task_id / "stderr")]
        assert (here / task_id / "stdout").read_bytes() == b""
        code, out, err = await vmlend(owner, "results", task_id, cwd=here)
        assert out.splitlines() == [
            f"{task_id}: cancelled",
            f"  {here / task_id / 'stdout'}",
            f"  {here / task_id / 'stderr'}",
        ]

        # run --json (and --detach --json): one JSON document, here of a task that never ran.
        code, out, err = await vmlend(
            owner, "run", "--json", "--image", "no-such-image@1", "--", "true"
        )
        assert code == 1, err
        final = json.loads(out)
        assert (final["state"], final["exit_code"], final["stdout"]) == ("failed", None, "")
        code, out, err = await vmlend(owner, "run", "-d", "--json", "--", "true")
        assert code == 0, err
        assert json.loads(out)["task_id"].startswith("run-")

        # A refusal: the message for people, the code only in JSON.
        code, out, err = await vmlend(owner, "status", "no-such-task")
        assert (code, out) == (1, "")
        assert err == "vmlend: this node submitted no task no-such-task\n"
        code, out, err = await vmlend(owner, "cancel", "--json", "no-such-task")
        assert code == 1
        assert json.loads(out) == {
            "error": {
                "code": "unknown_task",
                "message": "this node submitted no task no-such-task",
            }
        }

        # Named by the start of its ID, or of its random part, as docker's short IDs.
        short = task_id.rpartition("-")[2][:4]
        code, out, err = await vmlend(owner, "status", "--json", short)
        assert code == 0, err
        assert json.loads(out)["task_id"] == task_id
        submitted = dt.datetime.strptime(json.loads(out)["submitted_at"], "%Y-%m-%dT%H:%M:%SZ")
        assert submitted.replace(tzinfo=dt.UTC).timestamp() <= time.time()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        code, out, err = await vmlend(owner, "results", short, cwd=elsewhere)
        assert out.splitlines()[0] == f"{task_id}: cancelled", err
        assert (elsewhere / task_id / "stdout").exists()  # named by the whole ID
        # People get a header and a row per task, with its age.
        code, out, err = await vmlend(owner, "status")
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split() == ["TASK", "ID", "STATE", "EXIT", "SUBMITTED", "RUNTIME"]
        mine = next(r for r in rows if r.startswith(task_id))
        assert mine.split()[1:3] == ["cancelled", "-"]
        assert "ago" in mine or "just now" in mine, mine
        # Both runs above are "run-...": "run" names neither, and says so in one line.
        code, out, err = await vmlend(owner, "wait", "run")
        assert (code, out) == (1, "")
        assert err.startswith("vmlend: 'run' starts 2 task IDs (run-"), err
        assert err.endswith("): give more of it\n"), err


async def test_verbose_after_the_command_is_accepted(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    for argv in (["status", "-v"], ["node", "info", "-v"], ["-v", "peers", "-vv"]):
        with trio.fail_after(60):
            done = await trio.run_process(
                [*vmlend_command(), *argv, "--data", str(missing)],
                capture_stderr=True,
                check=False,
            )
        err = done.stderr.decode()
        assert done.returncode == 1, err  # the node is missing: not a usage error (2)
        assert f"no vmlend node is running with data dir {missing}" in err


async def test_a_missing_or_invalid_task_file_is_one_line_naming_the_file_and_exit_2(
    tmp_path: Path,
) -> None:
    """Checked before any node is asked (none runs here), so both are usage errors alike."""
    (tmp_path / "bad.toml").write_text('name = "x"\nos = "tiny"\ncommand = "true"\n'
                                       '[resources]\nmemory = "lots"\n')  # fmt: skip
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    cases = {
        "missing.toml": "missing.toml: no such task file",
        "bad.toml": "bad.toml:5: resources.memory: not a size: 'lots' (expected a number",
        "binary.toml": "binary.toml: not UTF-8 text (a task file is TOML)",
        ".": ": a directory, not a task file",
    }  # fmt: skip
    for name, message in cases.items():
        done = await trio.run_process(
            [*vmlend_command(), "submit", "--data", str(tmp_path / "nonode"), str(tmp_path / name)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 2, err
        assert err.startswith("vmlend submit: "), err
        assert message in err, err
        assert err.count("\n") == 1, err


async def test_a_mistyped_command_or_option_gets_the_closest_one_through_the_binary() -> None:
    cases = {
        ("stauts",): "did you mean 'status'?",
        ("node", "strat"): "did you mean 'start'?",
        ("status", "--jsn"): "did you mean '--json'?",
        ("catalog", "ls", "--knd", "os"): "did you mean '--kind'?",
    }
    for argv, hint in cases.items():
        with trio.fail_after(60):
            done = await trio.run_process(
                [*vmlend_command(), *argv], capture_stdout=True, capture_stderr=True, check=False
            )
        err = done.stderr.decode()
        assert (done.returncode, done.stdout) == (2, b""), err
        *_usage, last = err.rstrip("\n").split("\n")
        assert last.endswith(hint), err
        assert "Traceback" not in err, err
    done = await trio.run_process(
        [*vmlend_command(), "zzzzzz"], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 2
    assert b"invalid choice: 'zzzzzz'" in done.stderr
    assert b"did you mean" not in done.stderr  # nothing close: no guess
