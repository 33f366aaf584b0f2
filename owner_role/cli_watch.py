"""Watching a task from the command line: Ctrl-C, and what the task waits for.

``vmlend run`` and ``submit --wait`` own the task they wait for: a first Ctrl-C cancels it (the
user asked for it to stop, and nothing else would stop it on the lender), a second detaches and
prints the ``vmlend cancel`` command. ``wait`` and ``logs -f`` only watch, so Ctrl-C just ends them.

While a task has shown no output yet, :class:`Progress` tells a person on a terminal what it
waits for (the scheduler's own words, from ``task.status``), on one stderr line that is cleared
when output starts. Nothing is shown when stderr is not a terminal, or with ``--quiet``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from node.cli_common import CALL_TIMEOUT, EXIT_INTERRUPTED, node_client
from node.errors import VmlendError
from owner_role.cli import outcome

PROGRESS_AFTER = 3.0
"""Seconds of silence before saying what the task waits for: a task that starts at once says
nothing."""
PROGRESS_EVERY = 2.0
"""Seconds between two looks at the task's status while it waits."""
_CLEAR = "\r\x1b[K"


def cancel_command(args: argparse.Namespace, task_id: str) -> str:
    """The command that cancels ``task_id`` on the node ``args`` names."""
    data = f" --data {shlex.quote(args.data)}" if getattr(args, "data", None) else ""
    return f"vmlend cancel{data} {task_id}"


def cancel_on_interrupt(
    args: argparse.Namespace, task_id: str, command: str, watch: Callable[[], int]
) -> int:
    """``watch()``'s exit code; a Ctrl-C during it cancels the task (a second one detaches),
    and the exit code is then 130."""
    try:
        return watch()
    except KeyboardInterrupt:
        pass
    again = cancel_command(args, task_id)
    say = _Say(command)
    say(f"cancelling {task_id} (Ctrl-C again to detach)")
    try:
        # A new connection: the interrupted call's state is unknown (its request abandoned).
        with node_client(args, timeout=CALL_TIMEOUT) as client:
            status = client.call("task.cancel", {"task_id": task_id})
    except KeyboardInterrupt:
        say(f"detached; {task_id} may still be running; to cancel it: {again}")
        return EXIT_INTERRUPTED
    except VmlendError as e:
        say(f"could not cancel {task_id}: {e}; try again: {again}")
        return EXIT_INTERRUPTED
    say(f"{task_id} {outcome(status)}")
    return EXIT_INTERRUPTED


class _Say:
    def __init__(self, command: str) -> None:
        self.prefix = f"vmlend {command}: "

    def __call__(self, line: str) -> None:
        print(self.prefix + line, file=sys.stderr, flush=True)


class Progress:
    """What the task waits for, on a terminal's stderr until :meth:`output_started`.

    A daemon thread asks the node (on its own connection) every :data:`PROGRESS_EVERY` seconds,
    beginning after :data:`PROGRESS_AFTER`. The line and the task's output never interleave:
    both sides write under one lock, and once output started the line is gone for good.
    """

    def __init__(
        self, args: argparse.Namespace, task_id: str, *, stream: TextIO | None = None
    ) -> None:
        self._args = args
        self._task_id = task_id
        self._out = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._shown = False
        self.enabled = not getattr(args, "quiet", False) and self._out.isatty()

    def __enter__(self) -> Progress:
        if self.enabled:
            threading.Thread(target=self._run, name="vmlend-progress", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.output_started()

    def output_started(self) -> None:
        """Clear the line, and never show it again."""
        if self._stopped.is_set():
            return
        with self._lock:
            self._stopped.set()
            if self._shown:
                self._out.write(_CLEAR)
                self._out.flush()
                self._shown = False

    def _run(self) -> None:
        if self._stopped.wait(PROGRESS_AFTER):
            return
        try:
            with node_client(self._args, timeout=CALL_TIMEOUT) as client:
                while not self._stopped.is_set():
                    status = client.call("task.status", {"task_id": self._task_id})
                    self._show(waiting_line(status))
                    if self._stopped.wait(PROGRESS_EVERY):
                        return
        except VmlendError:
            return  # the main thread's own calls report what is wrong with the node

    def _show(self, line: str) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            width = _width(self._out)
            self._out.write(_CLEAR + line[: width - 1])
            self._out.flush()
            self._shown = True


def waiting_line(status: dict[str, Any]) -> str:
    """One line: the task's state and why it waits (the scheduler's first reasons)."""
    task_id, state = status.get("task_id"), status.get("state")
    reasons = [str(r) for r in status.get("waiting", [])]
    running = [r for r in status.get("replicas", []) if r.get("state") in ("leased", "running")]
    if not reasons and running:
        worker = str(running[0].get("worker") or "a worker")
        if running[0].get("state") == "running":
            return f"{task_id}: running on {worker}"
        fetched = running[0].get("fetched")
        if isinstance(fetched, int) and fetched > 0:
            return f"{task_id}: preparing on {worker}: {fetched / 2**20:.1f} MiB of its image here"
        return f"{task_id}: booting on {worker}"
    if not reasons:
        return f"{task_id}: {state}"
    return f"{task_id}: {state}: " + "; ".join(reasons[:3])


def _width(stream: TextIO) -> int:
    try:
        return max(20, os.get_terminal_size(stream.fileno()).columns or 80)
    except (OSError, ValueError):
        return 80
