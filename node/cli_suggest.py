""" "Did you mean ...?" for a mistyped command or option, as git and docker answer.

argparse (before Python 3.14) lists the choices or just says an argument is unrecognized;
:class:`SuggestingParser` adds the closest known command or option of the command in use.
Subparsers inherit the class (argparse makes them of the parent's type).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")


def closest(word: str, known: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return found[0] if found else None


class SuggestingParser(argparse.ArgumentParser):
    _argv: list[str] | None = None

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._argv = list(args) if args is not None else sys.argv[1:]
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        super().error(message + self._hint(message))

    def _hint(self, message: str) -> str:
        if m := _INVALID_CHOICE.search(message):
            guess = closest(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
        elif (m := _UNRECOGNIZED.search(message)) is not None:
            options = [w for w in m.group(1).split() if w.startswith("-")]
            known = list(_command_in_use(self, self._argv or [])._option_string_actions)
            guess = next((g for w in options if (g := closest(w.split("=")[0], known))), None)
        else:
            guess = None
        return f"; did you mean {guess!r}?" if guess else ""


def _command_in_use(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The innermost (sub)command ``argv`` names (``parser`` itself if none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    rest = argv[argv.index(word) + 1 :]
                    return _command_in_use(action.choices[word], rest)
    return parser
