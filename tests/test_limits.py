"""Adding a limit touches a row of node/limits.py, its Caps field and its enforcement, no more.

Built from the table of limits: every row must have the places written by hand (its typed
:class:`Caps` field, a backend that reads it, the lines documenting its keys), and every place
derived from the table (the caps' wire form, the lender's ``[worker]`` key and ceiling, the task
file's ``[resources]`` key, the task's wire form, the task's caps, the image manifest, the
comparison of a request with an allowance) must carry it end to end.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import node.config
from catalog import taskfile
from catalog.build.assemble import default_caps
from catalog.caps import Allowance, Caps, NetworkMode
from catalog.manifest import ImageManifest
from catalog.task_wire import task_from_wire, task_to_wire
from node.config import load_config
from node.limits import LIMITS, Limit, Unit
from node.units import MIB, format_rate, format_size
from worker_role.policy import LendingPolicy

REPO = Path(__file__).resolve().parent.parent
# Where a limit is enforced; the VM command line only builds caps from its flags.
BACKEND = [p for p in sorted((REPO / "worker_role" / "vm").rglob("*.py")) if p.name != "cli.py"]
NOT_LIMITS = {"network", "net_allow"}


def _read_by_backend() -> set[str]:
    """Every attribute name the VM backend reads (``caps.memory_mib`` -> ``memory_mib``)."""
    return {
        node.attr
        for path in BACKEND
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
    }


def _documents(text: str, key: str) -> bool:
    """Whether ``text`` has a line setting ``key`` (commented out or not), as the docs do."""
    return re.search(rf"(?m)^[#\s]*{re.escape(key)}\s*= ", text) is not None


def places_missing(limit: Limit) -> list[str]:
    """The places written by hand for each limit that lack ``limit``."""
    caps_fields = {f.name for f in dataclasses.fields(Caps)}
    missing = []
    if limit.name not in caps_fields:
        missing.append("its Caps field")
    if limit.name not in _read_by_backend():
        missing.append("its enforcement in worker_role/vm")
    if not _documents(node.config.__doc__ or "", limit.config_key):
        missing.append("its [worker] key in node/config.py's docstring")
    if not _documents((REPO / "node.toml.example").read_text(), limit.config_key):
        missing.append("its [worker] key in node.toml.example")
    if limit.task_key is not None and not _documents(taskfile.__doc__ or "", limit.task_key):
        missing.append("its [resources] key in catalog/taskfile.py's docstring")
    return missing


def test_every_limit_has_the_places_written_by_hand() -> None:
    assert {limit.name: places_missing(limit) for limit in LIMITS} == {
        limit.name: [] for limit in LIMITS
    }


def test_a_new_row_alone_is_caught() -> None:
    pids = Limit(
        name="pids", label="processes", unit=Unit.COUNT, least=1, most=2**22,
        config_key="max_pids", config_default=4096, task_key="pids",
    )  # fmt: skip
    assert places_missing(pids) == [
        "its Caps field",
        "its enforcement in worker_role/vm",
        "its [worker] key in node/config.py's docstring",
        "its [worker] key in node.toml.example",
        "its [resources] key in catalog/taskfile.py's docstring",
    ]


def test_the_caps_fields_are_the_limits_and_the_network() -> None:
    fields = {f.name: f for f in dataclasses.fields(Caps)}
    assert set(fields) - NOT_LIMITS == {limit.name for limit in LIMITS}
    defaults = Caps()
    for limit in LIMITS:
        assert fields[limit.name].type == ("float" if limit.unit is Unit.SHARE else "int")
        assert defaults.amount(limit.name) >= limit.least


def test_names_are_unique_and_a_bound_comes_first() -> None:
    for attr in ("name", "config_key", "task_key", "label"):
        values = [getattr(limit, attr) for limit in LIMITS if getattr(limit, attr) is not None]
        assert len(values) == len(set(values)), attr
    seen: set[str] = set()
    for limit in LIMITS:
        assert limit.at_most is None or limit.at_most in seen, limit.name
        seen.add(limit.name)


def _sample(limit: Limit) -> float:
    """A valid amount, in the caps' unit, that is no default anywhere."""
    return {Unit.COUNT: limit.least + 1, Unit.SHARE: 0.5, Unit.SIZE: limit.least + 100}.get(
        limit.unit, 4096
    )


def _written(limit: Limit, amount: float) -> str:
    """``amount`` as a person writes it in a task file, node.toml or a flag."""
    if limit.unit is Unit.SIZE:
        return f'"{format_size(int(amount) * MIB)}"'
    if limit.unit is Unit.RATE:
        return f'"{format_rate(int(amount))}"'
    return str(amount)


@pytest.mark.parametrize("limit", LIMITS, ids=lambda limit: limit.name)
def test_the_caps_wire_form_carries_it(limit: Limit) -> None:
    caps = Caps.of({limit.name: _sample(limit)})
    assert caps.to_wire()[limit.name] == _sample(limit)
    assert Caps.from_wire(caps.to_wire()) == caps


@pytest.mark.parametrize("limit", LIMITS, ids=lambda limit: limit.name)
def test_the_lenders_key_sets_the_policys_ceiling(limit: Limit, tmp_path: Path) -> None:
    defaults = load_config(tmp_path, env={})
    assert defaults.worker.limits[limit.config_key] == limit.config_default
    flag = {f"worker.{limit.config_key}": _written(limit, _sample(limit)).strip('"')}
    config = load_config(tmp_path, flag, env={})
    assert LendingPolicy.of(config.worker).ceilings[limit.name] == _sample(limit)


@pytest.mark.parametrize("limit", LIMITS, ids=lambda limit: limit.name)
def test_an_allowance_holds_a_request_to_it(limit: Limit) -> None:
    allowance = Allowance(ceilings={limit.name: _sample(limit)}, network=True)
    left = allowance.remaining()
    assert left is not None
    assert left.amount(limit.name) == _sample(limit)
    network = NetworkMode.PROXY
    assert allowance.violations(Caps.of({limit.name: _sample(limit)}, network=network)) == []
    over = Caps.of({limit.name: 2 * _sample(limit)}, network=network)
    (violation,) = allowance.violations(over, [Caps.of({limit.name: _sample(limit)})])
    assert violation.limit == limit.name
    assert violation.message.startswith(f"{limit.label} ")


TASK_LIMITS = [limit for limit in LIMITS if limit.task_key is not None]


@pytest.mark.parametrize("limit", TASK_LIMITS, ids=lambda limit: limit.name)
def test_a_task_file_asks_for_it_and_the_task_carries_it(limit: Limit, tmp_path: Path) -> None:
    text = f'name = "t"\nos = "tiny"\ncommand = "true"\n[resources]\n{limit.task_key} = '
    task = taskfile.loads(text + _written(limit, _sample(limit)) + "\n", base_dir=tmp_path)
    caps = default_caps(task)
    assert caps.amount(limit.name) == _sample(limit)
    assert task_from_wire(task_to_wire(task), base_dir=tmp_path) == task
    manifest = ImageManifest(
        os="tiny", os_version="1", kernel="a" * 64, initramfs="b" * 64, cmdline="", layers=(),
        caps=caps, command=("true",), env=(), cwd="/", timeout_s=60,
    )  # fmt: skip
    assert ImageManifest.decode(manifest.encode()).caps == caps
