"""vmlend(1) from the parser: every command and option is in it, and it is valid roff."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest

from node.cli import build_parser
from node.cli_completion import walk
from node.localnet import vmlend_command


@pytest.fixture(scope="module")
def page() -> str:
    done = subprocess.run(
        [*vmlend_command(), "man"], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_command_and_option_of_the_parser_is_on_the_page(page: str) -> None:
    plain = page.replace("\\-", "-").replace("\\&", "")
    commands = 0
    for path, sub in walk(build_parser(), "vmlend"):
        if path == "vmlend":
            continue
        commands += 1
        assert f'.SS "{path}"' in plain
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"\\fB{option}\\fR" in plain, (path, option)
    assert commands > 30
    for section in ("NAME", "SYNOPSIS", "COMMANDS", "EXIT STATUS", "FILES", "ENVIRONMENT"):
        assert f".SH {section}" in plain


def test_the_page_is_roff_that_man_renders_without_a_warning(page: str) -> None:
    groff = shutil.which("groff")
    assert groff, "groff (Debian's groff-base, installed by scripts/setup-system.sh) is needed"
    done = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z"],
        input=page,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert done.stderr == ""
