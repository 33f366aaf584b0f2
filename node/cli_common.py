"""What every ``vmlend`` command shares: exit codes, common options, the local node's client.

:mod:`node.cli` and the command modules of catalog and the roles take ``--data``, ``--json``, the
client and the exit codes from here, so that an option reads and behaves the same in every
command. Nothing heavy is imported at the top: ``vmlend --version`` loads this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from node.data_dir import resolve_data_dir
from node.errors import ConfigError, IdentityError, RpcError, VmlendError
from node.log_hygiene import LogHygiene, set_libp2p_level

if TYPE_CHECKING:
    from node.rpc_blocking_client import Client

EXIT_FAILURE = 1
"""The work failed: the node refused a call, a task failed or was cancelled, a build failed."""
EXIT_USAGE = 2
"""Bad usage or bad configuration: a wrong flag, an invalid task file (argparse exits 2 too)."""
EXIT_TIMEOUT = 124
"""A time limit passed: ``wait --timeout``, or ``vm run``'s guest command hit its limit (the code
``timeout(1)`` uses)."""
EXIT_GUEST_TIMEOUT = EXIT_TIMEOUT
EXIT_VM_FAILED = 125
"""``vm run``: the VM itself failed or was refused."""
EXIT_INTERRUPTED = 130
"""Ctrl-C: 128 + SIGINT, as shells report a command killed by it."""

AddArguments = Callable[[argparse.ArgumentParser], None]
"""Adds a command's arguments to its (sub)parser; it also sets ``handler(args) -> int``."""

CALL_TIMEOUT = 30.0
"""Seconds a command waits for the node to answer a question; commands that move data or wait
for a task pass ``timeout=None``."""


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", metavar="DIR", help="data directory (default: $VMLEND_DATA or the XDG data dir)"
    )


def add_json_option(parser: argparse.ArgumentParser, help: str = "print JSON for scripts") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line on a terminal")


def duration_argument(text: str) -> float:
    """An argparse ``type`` for durations (``30s``, ``5m``): a mistake is one usage line."""
    from node.units import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return seconds


def add_verbosity_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")


def configure_logging(verbosity: int) -> None:
    """Warnings and errors; ``-v`` adds info, ``-vv`` debug and libp2p's own chatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(_rfc3339_formatter())
    handler.addFilter(LogHygiene())  # what peers put in log lines is cut and rate-limited
    # A no-op where logging is set up already (a host program, a test runner): ours only.
    if verbosity < 2:
        # py-libp2p warns on every DHT stream a peer closes early and logs a multi-line error for
        # every protocol a peer does not speak; the p2p adapter raises an error of its own for
        # each, reported where it matters, so libp2p's own lines are debug output.
        set_libp2p_level(logging.CRITICAL + 1)  # not even a record is made
    else:
        set_libp2p_level(logging.NOTSET)
    logging.basicConfig(level=logging.WARNING - 10 * min(verbosity, 2), handlers=[handler])


def _rfc3339_formatter() -> logging.Formatter:
    """Log lines stamped like every time vmlend shows: RFC 3339 in UTC, ``...T05:24:27.113Z``."""
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(name)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    return formatter


def rfc3339(timestamp: float) -> str:
    """A wall-clock time as vmlend shows times to people and scripts: ``2026-12-07T05:24:27Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# The fields of what the node answers that hold a wall-clock time (Unix seconds on the wire).
TIME_FIELDS = frozenset({"submitted_at", "running_since", "finished_at", "created_at", "added_at"})


def times_as_rfc3339(value: object) -> object:
    """``value`` with every time field (:data:`TIME_FIELDS`, at any depth) as :func:`rfc3339`
    text: what ``--json`` prints, so scripts see one format, the one people see."""
    if isinstance(value, dict):
        return {
            k: rfc3339(v)
            if k in TIME_FIELDS and isinstance(v, int | float) and not isinstance(v, bool)
            else times_as_rfc3339(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [times_as_rfc3339(v) for v in value]
    return value


def data_dir(args: argparse.Namespace) -> Path:
    """The data directory ``--data`` names, else the default (see :mod:`node.data_dir`)."""
    return resolve_data_dir(args.data)


def node_client(args: argparse.Namespace, *, timeout: float | None = CALL_TIMEOUT) -> Client:
    """A blocking client of the node running on the data directory; it connects on first call."""
    from node.rpc_blocking_client import Client

    return Client(data_dir(args), timeout=timeout)


def command_after_dashes(remainder: Sequence[str]) -> list[str]:
    """The command of ``vmlend run -- CMD ARGS``: argparse's remainder without its ``--``."""
    argv = list(remainder)
    return argv[1:] if argv[:1] == ["--"] else argv


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    """Left-aligned columns two spaces apart, as wide as their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def run_command(args: argparse.Namespace) -> int:
    """Run the handler argparse chose (``args.handler``); a vmlend error becomes an exit code."""
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as e:
        return _failed(args, "configuration_error", f"configuration error: {e}", EXIT_USAGE)
    except IdentityError as e:
        return _failed(args, "identity_error", f"identity error: {e}", EXIT_USAGE)
    except RpcError as e:
        # The code is for scripts (--json); a person reads the message.
        return _failed(args, e.code, e.message, EXIT_FAILURE)
    except VmlendError as e:
        return _failed(args, "error", str(e), EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _failed(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    """One line on stderr; with ``--json`` also ``{"error": {"code", "message"}}`` on stdout."""
    print(f"vmlend: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message}}))
    return exit_code
