"""The ``vmlend`` command line as a whole: what it loads, and that every command still parses.

Start-up time is pinned by what a command imports, not by a clock: a fresh interpreter runs the
command, then reports ``sys.modules``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

import node
from node.cli import build_parser, main
from node.doctor import run_doctor

# Each costs tens of milliseconds or more to import; none is needed to answer these commands.
HEAVY = (
    "trio",
    "libvirt",
    "libp2p",
    "cryptography",
    "node.config",
    "node.daemon",
    "node.p2p",
    "catalog.build",
    "catalog.chunk_store",
    "worker_role.vm",
    "scheduler_role.queue",
)

RUN_AND_LIST_MODULES = """
import json, sys
from node.cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    main(argv)
except SystemExit:
    pass
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
"""


def modules_loaded_by(argv: list[str], tmp_path: Path) -> set[str]:
    out = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_MODULES, str(out), *argv],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return set(json.loads(out.read_text()))


def loaded(modules: set[str], package: str) -> set[str]:
    return {m for m in modules if m == package or m.startswith(package + ".")}


@pytest.mark.parametrize(
    ("argv", "modules_above_node"),
    [
        (["--version"], set()),
        (["version"], set()),
        (["peers", "--data", "{data}"], set()),
        (["status", "--data", "{data}"], {"owner_role", "owner_role.cli"}),
    ],
    ids=["--version", "version", "peers", "status"],
)
def test_quick_commands_load_only_what_they_use(
    argv: list[str], modules_above_node: set[str], tmp_path: Path
) -> None:
    data = tmp_path / "no-node-here"  # so status and peers fail fast: no node is running
    modules = modules_loaded_by([a.format(data=data) for a in argv], tmp_path)
    assert "node.cli" in modules
    for heavy in HEAVY:
        assert not loaded(modules, heavy), f"vmlend {argv[0]} imported {heavy}"
    packages_above_node = ("catalog", "scheduler_role", "worker_role", "owner_role")
    assert {m for p in packages_above_node for m in loaded(modules, p)} == modules_above_node


def test_status_and_peers_without_a_node_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("status", "peers"):
        assert main([command, "--data", str(tmp_path)]) == 1
        assert "no vmlend node is running" in capsys.readouterr().err


def test_every_command_adds_its_arguments_when_chosen(capsys: pytest.CaptureFixture[str]) -> None:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    names = list(commands.choices)
    assert {"node", "peers", "vm", "catalog", "blob", "submit", "run", "image"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exited:
            main([name, "--help"])
        assert exited.value.code == 0
        assert f"usage: vmlend {name}" in capsys.readouterr().out


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["lend-me-a-gpu"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_doctor_runs_the_vm_checks_it_is_handed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[Path] = []

    def vm_checks(vm_dir: Path) -> list[tuple[str, Literal["ok", "warn", "no"], str]]:
        asked.append(vm_dir)
        return [("fake vm", "no", "not a real backend"), ("slow vm", "warn", "emulated")]

    assert run_doctor(str(tmp_path), vm_checks=vm_checks, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(asked) == 1
    checks = report["checks"]
    assert {
        "name": "fake vm",
        "ok": False,
        "detail": "not a real backend",
        "warning": False,
    } in checks
    assert {"name": "slow vm", "ok": True, "detail": "emulated", "warning": True} in checks
    assert report["can_lend"] is False


def test_a_warning_is_shown_as_one_and_does_not_stop_lending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def vm_checks(vm_dir: Path) -> list[tuple[str, Literal["ok", "warn", "no"], str]]:
        return [("accelerator", "warn", "TCG (software emulation)")]

    assert run_doctor(str(tmp_path), vm_checks=vm_checks) == 0
    out = capsys.readouterr().out
    assert "WARN accelerator    TCG (software emulation)\n" in out
    assert out.endswith("this node can lend compute\n")


def test_version_names_what_a_bug_report_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["vmlend"] == node.__version__
    assert found["python"] == sys.version.split()[0]
    # Found on this machine (CI installs them all): none missing, each a dotted number.
    for name in ("py-libp2p", "trio", "libvirt-python", "libvirt", "qemu"):
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?.*", found[name] or ""), (name, found[name])
    assert found["kernel"]
    assert main(["version"]) == 0
    assert f"vmlend:         {node.__version__}\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["stauts"], "; did you mean 'status'?"),
        (["node", "strat"], "; did you mean 'start'?"),
        (["status", "--jsn"], "; did you mean '--json'?"),
        (["catalog", "ls", "--knd", "os"], "; did you mean '--kind'?"),
        (["wait", "--timeout=5s", "--quite", "t1"], "; did you mean '--quiet'?"),
    ],
)
def test_a_mistyped_command_or_option_gets_the_closest_one_suggested(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.rstrip("\n").endswith(hint)


@pytest.mark.parametrize("argv", [["zzzzzz"], ["status", "--qqqqqq"]])
def test_nothing_close_suggests_nothing(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "did you mean" not in capsys.readouterr().err
