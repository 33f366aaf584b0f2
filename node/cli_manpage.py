"""vmlend(1), generated from the parser itself, so it never falls behind the commands.

``vmlend man`` prints the page in roff (read it with ``vmlend man | man -l -``, or install it as
``/usr/local/share/man/man1/vmlend.1``): every command and subcommand with its usage, what it
does and each option, then the exit codes, files and environment every command shares.
"""

from __future__ import annotations

import argparse
import re

from node.cli_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    EXIT_VM_FAILED,
)
from node.cli_completion import walk

EXIT_CODES = (
    (0, "success (for wait, run and submit --wait: the task succeeded)"),
    (EXIT_FAILURE, "refused or failed: the node refused a call, a task failed or was cancelled"),
    (EXIT_USAGE, "bad usage or configuration: a wrong flag, an invalid task file or node.toml"),
    (EXIT_TIMEOUT, "a time limit passed (wait --timeout; vm run's command hit its limit)"),
    (EXIT_VM_FAILED, "vm run: the VM itself failed or was refused"),
    (EXIT_INTERRUPTED, "interrupted by Ctrl-C"),
)
FILES = (
    ("DATA/node.toml", "the node's settings; every key is listed in node.toml.example"),
    ("DATA/rpc.sock", "the running node's local RPC socket, which every command talks to"),
    ("~/.local/share/vmlend", "DATA when neither --data nor the environment names one"),
    ("bootstrap.toml", "the shipped defaults (bootstrap peers), read before node.toml"),
)
ENVIRONMENT = (
    ("VMLEND_DATA", "the data directory DATA, when --data is not given"),
    ("XDG_DATA_HOME", "DATA is $XDG_DATA_HOME/vmlend when neither of the above is given"),
    ("VMLEND_BOOTSTRAP", "a TOML file read in place of the shipped bootstrap.toml"),
)


def manpage(parser: argparse.ArgumentParser, *, version: str) -> str:
    out = [
        f'.TH VMLEND 1 "" "vmlend {_text(version)}" "User Commands"',
        ".SH NAME",
        f"vmlend \\- {_text(parser.description or '')}",
        ".SH SYNOPSIS",
        ".B vmlend",
        "[\\fB\\-v\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR...]",
        ".SH DESCRIPTION",
        "One node binary: a node lends this machine (worker), runs tasks for others'",
        "schedulers and borrows compute (owner), as its roles say. Every command but",
        ".B node start",
        "talks to the running node of its data directory.",
        ".SH COMMANDS",
    ]
    for path, sub in walk(parser, "vmlend"):
        if path == "vmlend":
            continue
        out += [f'.SS "{_text(path)}"', ".nf", _text(_usage(sub)), ".fi"]
        about = sub.description or _help_of(parser, path)
        if about:
            out += [".PP", _text(about)]
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction) or "-h" in action.option_strings:
                continue
            out += [".TP", _term(action), _text(action.help or "")]
    out += [".SH EXIT STATUS"]
    for code, meaning in EXIT_CODES:
        out += [".TP", f"\\fB{code}\\fR", _text(meaning)]
    out += [".PP", "vmlend run exits with the task's own exit code."]
    out += [".SH FILES"]
    for name, meaning in FILES:
        out += [".TP", f"\\fI{_text(name)}\\fR", _text(meaning)]
    out += [".SH ENVIRONMENT"]
    for name, meaning in ENVIRONMENT:
        out += [".TP", f"\\fB{name}\\fR", _text(meaning)]
    out += [
        ".SH SEE ALSO",
        "The README's sections on borrowing, lending and \\(lqWhen something goes wrong\\(rq.",
    ]
    return "\n".join(out) + "\n"


def _usage(sub: argparse.ArgumentParser) -> str:
    return re.sub(r"\s+", " ", sub.format_usage().removeprefix("usage: ")).strip()


def _help_of(parser: argparse.ArgumentParser, path: str) -> str:
    """The one-line help a command has in its parent's list (argparse keeps it there)."""
    *parents, name = path.split()
    for parent_path, parent in walk(parser, "vmlend"):
        if parent_path != " ".join(parents):
            continue
        for action in parent._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if choice.dest == name:
                        return choice.help or ""
    return ""


def _term(action: argparse.Action) -> str:
    names = action.option_strings or [str(action.metavar or action.dest)]
    words = ", ".join(f"\\fB{_text(n)}\\fR" for n in names)
    if action.option_strings and action.nargs != 0:
        metavar = action.metavar or action.dest.upper()
        words += f" \\fI{_text(str(metavar))}\\fR"
    return words


def _text(text: str) -> str:
    """Plain text as roff: backslashes and dashes escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(f"\\&{line}" if line[:1] in (".", "'") else line for line in text.split("\n"))
