"""Failed and cancelled tasks through the real ``vmlend`` binary (issue 18, item 7): the outcome in
words, never "exit code None" nor an ``exit_code`` file holding "None"; ``logs`` of a task that
ended without output says why and exits non-zero. No worker runs, so no task ever gets a VM."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode, local_network, vmlend_command

pytestmark = pytest.mark.e2e

ROLES = [("scheduler",), ("owner",)]
NO_SUCH_IMAGE = """\
name = "noimage"
image = "no-such-image@1"
command = "echo hi"
"""
QUEUED = """\
name = "queued"
os = "tiny"
command = "echo hi"
[resources]
memory = "128MiB"
"""


async def vmlend(node: LocalNode, *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    with trio.fail_after(120):
        done = await trio.run_process(
            [*vmlend_command(), *args[:1], "--data", str(node.data_dir), *args[1:]],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def _submit(owner: LocalNode, tmp_path: Path, text: str) -> str:
    (tmp_path / "task.toml").write_text(text)
    with trio.fail_after(60):
        await owner.call("schedulers.wait", {"count": 1, "timeout": 60})
    code, out, err = await vmlend(owner, "submit", str(tmp_path / "task.toml"))
    assert code == 0, err
    return out.strip()


async def test_failed_and_cancelled_tasks_say_how_they_ended(tmp_path: Path) -> None:
    async with local_network(tmp_path, 2, roles=ROLES) as (_, owner):
        failed = await _submit(owner, tmp_path, NO_SUCH_IMAGE)
        code, out, err = await vmlend(owner, "wait", failed)
        assert code == 1, (out, err)
        assert out.startswith(f"{failed}: never ran: "), out
        assert "None" not in out

        results = tmp_path / "failed-results"
        code, out, err = await vmlend(owner, "results", failed, "-o", str(results))
        assert code == 1, err
        assert out.splitlines()[0].startswith(f"{failed}: never ran: "), out
        assert "None" not in out
        assert not (results / "exit_code").exists()

        code, out, err = await vmlend(owner, "logs", failed)
        assert (code, out) == (1, ""), err
        assert err.count("\n") == 1, err
        assert err.startswith(f"vmlend logs: {failed} never ran: "), err
        assert err.endswith("; it left no output\n"), err

        cancelled = await _submit(owner, tmp_path, QUEUED)
        code, out, err = await vmlend(owner, "cancel", cancelled)
        assert code == 0, err
        code, out, err = await vmlend(owner, "wait", cancelled)
        assert (code, out) == (1, f"{cancelled}: cancelled\n"), err
        code, out, err = await vmlend(owner, "results", cancelled, "-o", str(results))
        assert code == 1, err
        assert out.splitlines()[0] == f"{cancelled}: cancelled"
        assert not (results / "exit_code").exists()
        code, out, err = await vmlend(owner, "logs", "-f", cancelled)
        assert (code, err) == (1, f"vmlend logs: {cancelled} cancelled; it left no output\n")
