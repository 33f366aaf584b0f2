"""DESIGN.md's import rules, enforced by walking every module's imports (lazy ones included).

- roles import ``node`` and ``catalog``, never each other;
- ``catalog`` imports ``node`` only; ``node`` imports no role except in its two composing modules;
- only ``node/p2p*`` imports libp2p (and its multiaddr), only ``worker_role/vm*`` imports libvirt.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "catalog", "scheduler_role", "worker_role", "owner_role")
ROLES = {"scheduler_role", "worker_role", "owner_role"}
COMPOSERS = {"node/daemon.py", "node/cli.py"}
FORBIDDEN = {
    "node": {"catalog", *ROLES},
    "catalog": ROLES,
    **{role: ROLES - {role} for role in ROLES},
}


def imported(source: str) -> Iterator[tuple[int, str]]:
    """(line, top-level-qualified module) for every import statement in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def violations(path: str, source: str) -> list[str]:
    """Every import of ``source`` (the module at repo-relative ``path``) that breaks a rule."""
    package = path.split("/", 1)[0]
    found = []
    for line, module in imported(source):
        top = module.split(".", 1)[0]
        where = f"{path}:{line} imports {module}"
        if top in FORBIDDEN.get(package, set()) and path not in COMPOSERS:
            found.append(f"{where}: {package} must not import {top}")
        if top in ("libp2p", "multiaddr") and not path.startswith("node/p2p"):
            found.append(f"{where}: only node/p2p* may import libp2p")
        if top == "libvirt" and not path.startswith("worker_role/vm"):
            found.append(f"{where}: only worker_role/vm* may import libvirt")
    return found


def test_every_module_keeps_the_import_rules() -> None:
    found = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            found += violations(path, file.read_text())
    assert not found, "\n".join(found)


def test_composers_may_import_roles_only_in_node() -> None:
    # The composing modules are node's; a same-named file elsewhere gets no exemption.
    assert violations("node/cli.py", "import worker_role.agent") == []
    assert violations("catalog/cli.py", "import worker_role.agent") != []


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("scheduler_role/x.py", "from worker_role.caps import Caps"),
        ("worker_role/agent.py", "def f():\n    from scheduler_role import service\n"),
        ("catalog/x.py", "import scheduler_role.queue as q"),
        ("owner_role/service.py", "from scheduler_role.service import SchedulerService"),
        ("scheduler_role/x.py", "from owner_role.cli import run_task"),
        ("node/doctor.py", "def f():\n    import worker_role.vm.doctor\n"),
        ("catalog/x.py", "from libp2p.peer.id import ID"),
        ("node/rpc.py", "import multiaddr"),
        ("scheduler_role/x.py", "import libvirt"),
        ("worker_role/agent.py", "import libvirt"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(path: str, source: str) -> None:
    assert violations(path, source)


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("worker_role/agent.py", "from catalog.dispatch import LeaseKey"),
        ("scheduler_role/x.py", "from catalog.caps import Caps\nfrom node.wire import x"),
        ("node/p2p_host.py", "from libp2p import new_host"),
        ("worker_role/vm/conn.py", "import libvirt"),
        ("catalog/x.py", "from . import sibling"),
    ],
)
def test_the_checker_allows_what_design_allows(path: str, source: str) -> None:
    assert violations(path, source) == []


@pytest.mark.parametrize(
    ("module", "never"),
    [
        ("worker_role.agent", ("scheduler_role", "owner_role", "catalog.build")),
        ("scheduler_role.service", ("worker_role", "owner_role")),
        ("owner_role.service", ("worker_role", "scheduler_role", "catalog.build")),
    ],
)
def test_a_role_loads_none_of_the_others(module: str, never: tuple[str, ...]) -> None:
    # Imports through the contract modules can still drag a role in indirectly; this catches it.
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = [m for m in out.stdout.split() if m.startswith(never)]
    assert loaded == [], f"importing {module} loads {loaded}"
