"""Shell completion (issue 18), generated from the parser, run in a real bash and a real zsh."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from node.cli import build_parser
from node.cli_completion import script, words_by_command

ZSH_COMPINIT = "autoload -Uz compinit && compinit -u"


def test_every_command_and_its_options_are_in_the_table() -> None:
    table = words_by_command(build_parser())
    assert {"status", "run", "node", "catalog", "completion"} <= set(table["vmlend"])
    assert {"start", "info"} <= set(table["vmlend node"])
    assert {"--env", "--disk", "--cpu-share", "--detach"} <= set(table["vmlend run"])
    assert "--roles" in table["vmlend node start"]
    assert "vmlend catalog ls" in table  # a command whose arguments are added only on use


def _complete(shell: str, path: Path, words: list[str]) -> list[str]:
    quoted = " ".join(f"'{w}'" for w in words)
    if shell == "bash":
        program = f"source {path}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _vmlend"
        program += '; printf "%s\\n" "${COMPREPLY[@]}"'
        argv = ["bash", "-c", program]
    else:
        program = (
            f"{ZSH_COMPINIT}; source {path}; setopt ksharrays; "
            f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _vmlend; "
            'print -rl -- "${COMPREPLY[@]}"'
        )
        argv = ["zsh", "-f", "-c", program]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.split()


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_shell_completes_commands_subcommands_and_options_and_leaves_files_to_itself(
    shell: str, tmp_path: Path
) -> None:
    path = tmp_path / f"vmlend.{shell}"
    path.write_text(script(build_parser(), shell))
    (tmp_path / "task.toml").write_text("")

    def offered(*words: str) -> set[str]:
        return set(_complete(shell, path, list(words)))

    assert offered("vmlend", "sta") == {"status"}
    assert offered("vmlend", "node", "st") == {"start"}
    assert offered("vmlend", "node", "") == {"start", "info", "--help"}
    assert "--json" in offered("vmlend", "-v", "status", "--j")
    assert "--roles" not in offered("vmlend", "status", "--")  # another command's option
    # A file name: nothing of ours, and the shell's own completion takes over (-o default).
    assert offered("vmlend", "submit", str(tmp_path / "task.")) == set()
    if shell == "bash":
        registered = f"source {path}; complete -p vmlend"
        done = subprocess.run(["bash", "-c", registered], capture_output=True, text=True)
    else:
        registered = f"{ZSH_COMPINIT}; source {path}; print ${{_comps[vmlend]}}"
        done = subprocess.run(["zsh", "-f", "-c", registered], capture_output=True, text=True)
    assert "-o default -F _vmlend" in done.stdout, done
