"""The task owner's commands: ``vmlend submit / status / logs / wait / results / cancel / run``.

All go through the local node's RPC (``task.*``, see :mod:`owner_role.service`); the node
forwards them to the scheduler holding the task. Exit codes: 0 done (or the task's own exit code for
``run``), 1 the task failed or was cancelled or the node refused, 2 bad usage, 124 ``wait
--timeout`` passed, 130 interrupted (Ctrl-C; on ``run`` and ``submit --wait`` it cancels the
task, see :mod:`owner_role.cli_watch`). ``--json`` prints one JSON document on stdout, and a
refusal as ``{"error": {"code", "message"}}``. :mod:`node.cli` names the commands and calls
:func:`add_owner_arguments` only for the one that runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.cli_common import (
    EXIT_FAILURE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    AddArguments,
    add_data_option,
    add_json_option,
    add_quiet_option,
    command_after_dashes,
    duration_argument,
    node_client,
    times_as_rfc3339,
)
from node.rpc import Notification
from node.rpc_blocking_client import Client, Result
from node.terminal import RAW_HELP, OutputWriter

if TYPE_CHECKING:  # imported where used: ``status`` and ``logs`` must start fast
    from catalog.taskfile import TaskFile


ID_HELP = "the task's ID, or the start of it (or of its random part) that no other task has"


Handler = Callable[[argparse.Namespace], int]


def by_whole_id(handler: Handler) -> Handler:
    """``handler`` with ``args.task_id`` made whole (``task.resolve``), so that what it prints
    and the directories it names carry the task's whole ID even when the user gave its start."""

    def resolved(args: argparse.Namespace) -> int:
        if args.task_id:
            args.task_id = _client(args).call("task.resolve", {"task_id": args.task_id})["task_id"]
        return handler(args)

    return resolved


def add_owner_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Add the arguments of the owner's ``command`` (``submit``, ``status``, ...) to its parser."""
    add_data_option(parser)
    _ARGUMENTS[command](parser)


SCHEDULER_HELP = (
    "scheduler peer ID (default: a trusted one, else this node's own choice among those found;"
    " 'vmlend schedulers' shows which)"
)


def _submit_arguments(submit: argparse.ArgumentParser) -> None:
    submit.add_argument("task", type=Path, metavar="TASK.toml")
    submit.add_argument("--scheduler", metavar="PEER", help=SCHEDULER_HELP)
    submit.add_argument(
        "--wait", action="store_true", help="wait until the task is over (Ctrl-C cancels it)"
    )
    add_quiet_option(submit)
    add_json_option(submit, help="print the task ID (with --wait, the final status) as JSON")
    submit.set_defaults(handler=cmd_submit)


def _status_arguments(status: argparse.ArgumentParser) -> None:
    status.add_argument("task_id", nargs="?", metavar="ID", help=ID_HELP)
    add_json_option(status)
    status.set_defaults(handler=by_whole_id(cmd_status))


def _logs_arguments(logs: argparse.ArgumentParser) -> None:
    logs.add_argument("task_id", metavar="ID", help=ID_HELP)
    logs.add_argument("--follow", "-f", action="store_true", help="until the task is over")
    logs.add_argument("--raw", action="store_true", help=RAW_HELP)
    add_quiet_option(logs)
    add_json_option(logs, help="the output so far as one JSON object (not with -f)")
    logs.set_defaults(handler=by_whole_id(cmd_logs))


def _wait_arguments(wait: argparse.ArgumentParser) -> None:
    wait.add_argument("task_id", metavar="ID", help=ID_HELP)
    wait.add_argument(
        "--timeout",
        type=duration_argument,
        metavar="DURATION",
        help="give up after this long (e.g. 30s, 5m), exit 124; the task goes on",
    )
    add_quiet_option(wait)
    add_json_option(wait, help="print the final status as JSON")
    wait.set_defaults(handler=by_whole_id(cmd_wait))


def _cancel_arguments(cancel: argparse.ArgumentParser) -> None:
    cancel.add_argument("task_id", metavar="ID", help=ID_HELP)
    add_json_option(cancel, help="print the task's status as JSON")
    cancel.set_defaults(handler=by_whole_id(cmd_cancel))


def _results_arguments(results: argparse.ArgumentParser) -> None:
    results.add_argument("task_id", metavar="ID", help=ID_HELP)
    results.add_argument(
        "-o", "--out", type=Path, metavar="DIR", help="where to write them (default: ./ID)"
    )
    add_json_option(results, help="print the status and the files written as JSON")
    results.set_defaults(handler=by_whole_id(cmd_results))


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--raw", action="store_true", help=RAW_HELP)
    run.add_argument("--cpus", type=int, default=1)
    run.add_argument(
        "--cpu-share", type=float, metavar="N", help="host CPUs the VM may use (default: --cpus)"
    )
    run.add_argument("--memory", default="256MiB", metavar="SIZE")
    run.add_argument("--disk", metavar="SIZE", help="the writable scratch disk (default 256MiB)")
    run.add_argument(
        "--env", "-e", action="append", default=[], metavar="NAME=VALUE",
        help="set an environment variable in the task (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--network", choices=("none", "proxy"), default="none",
        help="proxy: reach the --allow destinations through the worker's egress proxy",
    )  # fmt: skip
    run.add_argument(
        "--allow", action="append", default=[], metavar="HOST:PORT",
        help="a destination the task may reach (with --network proxy; repeatable)",
    )  # fmt: skip
    run.add_argument("--os", default=None, help="default tiny")
    run.add_argument(
        "--image",
        metavar="REF",
        help="a ready image: its ID or a catalog image NAME[@VERSION] (no --os, "
        "--package or --file with it)",
    )
    run.add_argument("--package", action="append", default=[], metavar="P")
    run.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="PATH",
        help="relative to the current directory; lands under /task",
    )
    run.add_argument("--timeout", default="10m", help="max runtime, e.g. 30s")
    run.add_argument("--scheduler", metavar="PEER", help=SCHEDULER_HELP)
    run.add_argument(
        "--detach", "-d", action="store_true", help="print the task ID and return at once"
    )
    add_quiet_option(run)
    add_json_option(
        run,
        help="no live output: at the end, the final status with stdout and stderr as JSON "
        "(with --detach, the task ID)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    run.set_defaults(handler=cmd_run)


def _client(args: argparse.Namespace) -> Client:
    # No timeout: a task is waited for, or its logs followed, as long as it runs.
    return node_client(args, timeout=None)


def submit_text(
    client: Client, text: str, base_dir: Path, scheduler: str | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {"text": text, "base_dir": str(base_dir.resolve())}
    if scheduler:
        params["scheduler"] = scheduler
    answer: dict[str, Any] = client.call("task.submit", params)
    return answer


def cmd_submit(args: argparse.Namespace) -> int:
    from catalog.errors import TaskFileError
    from catalog.taskfile import loads, read

    path: Path = args.task
    try:
        # Checked here first, so a mistake is named with its file and refused like any usage
        # error, before a node is asked; the node parses the same text again as its own check.
        text = read(path)
        loads(text, source=str(path), base_dir=path.parent)
    except TaskFileError as e:
        print(f"vmlend submit: {e}", file=sys.stderr)
        return EXIT_USAGE
    client = _client(args)
    answer = submit_text(client, text, path.parent, args.scheduler)
    task_id = answer["task_id"]
    if not args.json:
        print(task_id, flush=True)
    if not args.wait:
        if args.json:
            print_json(answer)
        return 0
    from owner_role.cli_watch import Progress, cancel_on_interrupt

    def watch() -> int:
        with Progress(args, task_id):
            status = wait_until_over(client, task_id)
        return _print_final(status, as_json=args.json)

    # Waiting, this command owns the task: Ctrl-C cancels it (see owner_role.cli_watch).
    return cancel_on_interrupt(args, task_id, "submit", watch)


def wait_until_over(client: Client, task_id: str, timeout: float | None = None) -> dict[str, Any]:
    """The task's status once it is over, or (not finished) once ``timeout`` seconds passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
        status: dict[str, Any] = client.call(
            "task.wait", {"task_id": task_id, "timeout": max(left, 0.001)}
        )
        if status.get("finished") or (deadline is not None and time.monotonic() >= deadline):
            return status


WAIT_SLICE = 3600.0
"""Seconds of one ``task.wait`` call; waiting longer takes several."""


def _print_final(status: dict[str, Any], *, as_json: bool = False) -> int:
    if as_json:
        print_json(status)
    else:
        print(f"{status['task_id']}: {outcome(status)}")
    return 0 if status["state"] in ("succeeded", "done") else EXIT_FAILURE


def print_json(value: Any) -> None:
    """One JSON document on stdout; bytes (a task's output) as UTF-8 text."""
    print(json.dumps(times_as_rfc3339(value), default=_json_default), flush=True)


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    raise TypeError(f"{type(value).__name__} is not JSON")


def outcome(status: dict[str, Any]) -> str:
    """How a task ended (or where it is), in words: never "exit code None"."""
    state = str(status.get("state"))
    code = status.get("exit_code")
    reason = str(status.get("reason") or "")
    if code is not None:
        return f"{state} (exit code {code})"
    if state == "cancelled":
        return "cancelled"
    if state == "failed":
        if "max runtime" in reason:
            return f"timed out: {reason}"
        ran = any(r.get("attempts") for r in status.get("replicas", []))
        return f"failed: {reason}" if ran else f"never ran: {reason or 'no worker took it'}"
    return f"{state}: {reason}" if reason else state


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    params = {"task_id": args.task_id} if args.task_id else {}
    found = client.call("task.status", params)
    if args.json:
        print_json(found)
        return 0
    from owner_role.status_view import status_lines

    statuses = found if isinstance(found, list) else [found]
    for line in status_lines(statuses, time.time()):
        print(line)
    return 0


def follow_logs(
    client: Client,
    task_id: str,
    *,
    follow: bool,
    raw: bool = False,
    on_output: Callable[[], None] | None = None,
) -> tuple[str, int]:
    """Copy the task's output to ours (made safe for a terminal unless ``raw``); the task's
    state at the end and how many bytes of output there were. ``on_output`` is called before
    the first of them is written."""
    state = ""
    written = 0
    output = OutputWriter(raw=raw)
    for item in client.stream("task.logs", {"task_id": task_id, "follow": follow}):
        if isinstance(item, Notification) and item.method == "task.log":
            kind, data = item.params
            if not written and on_output is not None:
                on_output()
            written += len(data)
            output.write(str(kind), bytes(data))
        elif isinstance(item, Result):
            state = str(item.value.get("state"))
    return state, written


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.json:
        if args.follow:
            print("vmlend logs: --json does not go with --follow", file=sys.stderr)
            return EXIT_USAGE
        return _logs_json(client, args.task_id)
    if args.follow:
        from owner_role.cli_watch import Progress

        with Progress(args, args.task_id) as progress:
            state, written = follow_logs(
                client, args.task_id, follow=True, raw=args.raw, on_output=progress.output_started
            )
    else:
        state, written = follow_logs(client, args.task_id, follow=False, raw=args.raw)
    if written or state not in _ENDED_BADLY:
        return 0
    # Nothing to show, and there never will be: say why rather than print nothing.
    status = client.call("task.status", {"task_id": args.task_id})
    print(f"vmlend logs: {args.task_id} {outcome(status)}; it left no output", file=sys.stderr)
    return EXIT_FAILURE


_ENDED_BADLY = frozenset({"failed", "cancelled"})


def _logs_json(client: Client, task_id: str) -> int:
    output = {"stdout": b"", "stderr": b""}
    state = ""
    for item in client.stream("task.logs", {"task_id": task_id, "follow": False}):
        if isinstance(item, Notification) and item.method == "task.log":
            kind, data = item.params
            name = "stdout" if kind == "stdout" else "stderr"
            output[name] += bytes(data)
        elif isinstance(item, Result):
            state = str(item.value.get("state"))
    print_json({"task_id": task_id, "state": state} | output)
    ended_badly = state in _ENDED_BADLY and not any(output.values())
    return EXIT_FAILURE if ended_badly else 0


def cmd_wait(args: argparse.Namespace) -> int:
    from owner_role.cli_watch import Progress

    with Progress(args, args.task_id):
        status = wait_until_over(_client(args), args.task_id, args.timeout)
    if not status.get("finished"):
        from node.units import format_duration

        if args.json:
            print_json(status)
        print(
            f"vmlend wait: {args.task_id} is still {outcome(status)} after "
            f"{format_duration(args.timeout)}; it goes on ('vmlend cancel' stops it)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    return _print_final(status, as_json=args.json)


def cmd_results(args: argparse.Namespace) -> int:
    out = (args.out or Path(args.task_id)).resolve()
    answer = _client(args).call("task.results", {"task_id": args.task_id, "out": str(out)})
    names = ["stdout", "stderr"]
    names += ["exit_code"] if answer.get("exit_code") is not None else []
    names += ["out.tar"] if answer.get("archive") else []
    if args.json:
        answer.pop("stdout", None)
        answer.pop("stderr", None)
        print_json(answer | {"out": str(out), "files": [str(out / n) for n in names]})
    else:
        print(f"{args.task_id}: {outcome(answer)}")
        for name in names:
            print(f"  {out / name}")
        if answer.get("partial") and (answer.get("stdout") or answer.get("stderr")):
            print("  (partial: what it printed before it ended; it gave no result)")
    return 0 if answer.get("exit_code") is not None else EXIT_FAILURE


def cmd_cancel(args: argparse.Namespace) -> int:
    status = _client(args).call("task.cancel", {"task_id": args.task_id})
    if args.json:
        print_json(status)
    else:
        print(f"{args.task_id}: {outcome(status)}")
    return 0


# The task-file keys ``vmlend run`` fills, and the flag each comes from (for error messages).
_RUN_FLAGS = {
    "os": "--os",
    "image": "--image",
    "packages": "--package",
    "files": "--file",
    "resources.cpus": "--cpus",
    "resources.cpu_share": "--cpu-share",
    "resources.memory": "--memory",
    "resources.disk": "--disk",
    "resources.network": "--network",
    "resources.allow": "--allow",
    "env": "--env",
    "limits.max_runtime": "--timeout",
}


def _flag_of(key: str) -> str:
    """The ``vmlend run`` flag that set task-file key ``key`` (``env.X``: ``--env``)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if (flag := _RUN_FLAGS.get(".".join(parts[:n]))) is not None:
            return flag
    return key


def run_task(args: argparse.Namespace, argv: list[str], base_dir: Path) -> TaskFile:
    """The task ``vmlend run`` submits, built from its flags with the task file's own rules;
    a bad flag raises :class:`TaskFileError` naming the task-file key (see ``_RUN_FLAGS``)."""
    from catalog.taskfile import from_table

    table: dict[str, Any] = {"name": "run", "command": argv}
    if args.image is not None:
        table["image"] = args.image
    else:
        table |= {"os": args.os or "tiny", "packages": list(args.package), "files": list(args.file)}
    share = args.cpu_share if args.cpu_share is not None else float(args.cpus)
    resources: dict[str, Any] = {"cpus": args.cpus, "cpu_share": share, "memory": args.memory}
    if args.disk is not None:
        resources["disk"] = args.disk
    if args.network != "none" or args.allow:
        resources |= {"network": args.network, "allow": list(args.allow)}
    table["resources"] = resources
    table["env"] = _env_of(args.env)
    table["limits"] = {"max_runtime": args.timeout, "max_attempts": 3}
    return from_table(table, source="vmlend run", base_dir=base_dir)


def _env_of(pairs: list[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` flags as the task file's ``env`` table (the task file checks the
    names); one without ``=`` is refused."""
    from catalog.errors import TaskFileError

    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise TaskFileError(f"{pair!r} is not NAME=VALUE", source="vmlend run", key="env")
        env[name] = value
    return env


def cmd_run(args: argparse.Namespace) -> int:
    argv = command_after_dashes(args.argv)
    if not argv:
        print("vmlend run: no command (give it after --)", file=sys.stderr)
        return EXIT_USAGE
    if args.image is not None and (args.os is not None or args.package or args.file):
        print("vmlend run: --image cannot go with --os, --package or --file", file=sys.stderr)
        return EXIT_USAGE
    from catalog.errors import TaskFileError
    from catalog.task_wire import task_to_wire

    try:
        task = run_task(args, argv, Path.cwd())
    except TaskFileError as e:
        print(f"vmlend run: {_flag_of(e.key or '')}: {e.reason}", file=sys.stderr)
        return EXIT_USAGE
    client = _client(args)
    params: dict[str, Any] = {"task": task_to_wire(task), "base_dir": str(task.base_dir)}
    if args.scheduler:
        params["scheduler"] = args.scheduler
    answer = client.call("task.submit", params)
    task_id = answer["task_id"]
    if args.detach:
        if args.json:
            print_json(answer)
        else:
            print(task_id, flush=True)
        return 0
    print(f"vmlend run: task {task_id}", file=sys.stderr, flush=True)
    from owner_role.cli_watch import Progress, cancel_on_interrupt

    def watch() -> int:
        with Progress(args, task_id) as progress:
            if args.json:  # the output comes in the final JSON document, not live
                wait_until_over(client, task_id)
            else:
                follow_logs(
                    client, task_id, follow=True, raw=args.raw, on_output=progress.output_started
                )
        status = wait_until_over(client, task_id)
        if args.json:
            found = client.call("task.results", {"task_id": task_id})
            print_json(status | {"stdout": found["stdout"], "stderr": found["stderr"]})
        code = status.get("exit_code")
        if code is None:
            print(f"vmlend run: {task_id} {outcome(status)}", file=sys.stderr)
            return EXIT_FAILURE
        return int(code)

    return cancel_on_interrupt(args, task_id, "run", watch)


_ARGUMENTS: dict[str, AddArguments] = {
    "submit": _submit_arguments,
    "status": _status_arguments,
    "logs": _logs_arguments,
    "wait": _wait_arguments,
    "results": _results_arguments,
    "cancel": _cancel_arguments,
    "run": _run_arguments,
}
