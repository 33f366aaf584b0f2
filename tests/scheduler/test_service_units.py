"""Unit tests of the scheduler service's and the owner side's pure parts (no network, no VMs)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import tarfile
from pathlib import Path

import pytest

from catalog.build.assemble import default_caps
from catalog.caps import MIB, Caps
from catalog.dispatch import LeaseKey
from catalog.errors import TaskFileError
from catalog.taskfile import loads
from node.dht_records import peer_id_of
from node.errors import RemoteProtocolError
from node.identity import Identity
from owner_role.cli import run_task
from owner_role.service import _tar
from scheduler_role.owner_api import spec_of
from scheduler_role.service import MAX_LOG_TASKS, SchedulerService, public_key_of
from worker_role.policy import VM_OVERHEAD_MIB, LendingPolicy


def test_public_key_of_a_peer_id_round_trips() -> None:
    me = Identity.generate()
    assert public_key_of(peer_id_of(me.public_bytes)) == me.public_bytes


@pytest.mark.parametrize("bad", ["", "0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
def test_public_key_of_refuses_what_holds_no_ed25519_key(bad: str) -> None:
    with pytest.raises(RemoteProtocolError):
        public_key_of(bad)


def test_task_file_maps_onto_caps_and_spec() -> None:
    task = loads(
        'name = "x"\nos = "tiny"\ncommand = "true"\nreplicas = 3\nquorum = 2\n'
        '[resources]\ncpus = 2\nmemory = "300MiB"\n[limits]\nmax_runtime = "1m"\n'
        'deadline = "1h"\nmax_attempts = 5\n'
    )
    assert default_caps(task) == Caps(vcpus=2, cpu_share=2.0, memory_mib=300, disk_mib=256)
    spec = spec_of(task, "x-1", "owner1", now=1000.0)
    assert (spec.replicas, spec.quorum, spec.limits.max_attempts) == (3, 2, 5)
    assert (spec.limits.max_runtime, spec.limits.deadline) == (60.0, 4600.0)


def test_a_tiny_task_maps_onto_the_least_a_vm_runs_with() -> None:
    # The loader refuses such a file; a TaskFile built otherwise must still map to valid caps.
    loaded = loads('name = "x"\nos = "tiny"\ncommand = "true"\n')
    task = dataclasses.replace(
        loaded,
        resources=dataclasses.replace(
            loaded.resources,
            amounts={**loaded.resources.amounts, "memory": 16 * MIB, "disk": 100 * 1024},
        ),
    )
    caps = default_caps(task)
    assert (caps.memory_mib, caps.disk_mib) == (32, 1)


def test_vmlend_run_builds_its_task_from_the_flags(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    flags = {"cpu_share": None, "disk": None, "env": [], "network": "none", "allow": []}
    args = argparse.Namespace(
        os="tiny", package=[], file=["a.txt"], cpus=1, memory="128MiB", timeout="30s", image=None,
        **flags,
    )  # fmt: skip
    task = run_task(args, ["sh", "-c", 'echo "quoted" \\ $HOME'], tmp_path)
    assert task.command == ("sh", "-c", 'echo "quoted" \\ $HOME')
    assert (task.files, task.limits.max_runtime, task.resources.amounts["memory"]) == (
        ("a.txt",), 30.0, 128 << 20,
    )  # fmt: skip
    ready = argparse.Namespace(
        os=None, package=[], file=[], cpus=1, memory="128MiB", timeout="30s", image="hello@1",
        **flags,
    )  # fmt: skip
    task = run_task(ready, ["true"], tmp_path)
    assert (task.image, task.os, task.files, task.command) == ("hello@1", "", (), ("true",))
    bad = argparse.Namespace(**{**vars(args), "memory": "lots"})
    with pytest.raises(TaskFileError) as info:
        run_task(bad, ["true"], tmp_path)
    assert info.value.key == "resources.memory"  # which cmd_run names as --memory
    assert info.value.line is None  # no file the user never wrote

    # --env, --disk, --cpu-share, --network and --allow: the task file's keys, checked alike.
    more = {"cpus": 2, "cpu_share": 0.5, "disk": "1GiB", "env": ["A=1", "B=x=y"]}
    full = argparse.Namespace(
        **{**vars(args), **more, "network": "proxy", "allow": ["pypi.org:443"]}
    )
    task = run_task(full, ["true"], tmp_path)
    assert task.env == {"A": "1", "B": "x=y"}
    amounts = task.resources.amounts
    assert (amounts["cpus"], amounts["cpu_share"], amounts["disk"]) == (2, 0.5, 1 << 30)
    assert (task.resources.network, task.resources.allow) == ("proxy", ("pypi.org:443",))
    for flag, value, key in [
        ("env", ["NOEQUALS"], "env"),
        ("env", ["1BAD=x"], "env.1BAD"),
        ("disk", "huge", "resources.disk"),
        ("allow", ["pypi.org:443"], "resources.allow"),  # without --network proxy
    ]:
        with pytest.raises(TaskFileError) as info:
            run_task(argparse.Namespace(**{**vars(args), flag: value}), ["true"], tmp_path)
        assert info.value.key == key, (flag, value, info.value)


def test_task_files_are_collected_relative_and_never_from_outside(tmp_path: Path) -> None:
    (tmp_path / "task" / "data").mkdir(parents=True)
    (tmp_path / "task" / "main.sh").write_text("echo hi\n")
    (tmp_path / "task" / "data" / "x").write_text("x")
    (tmp_path / "secret").write_text("no")
    base = tmp_path / "task"
    task = loads('name="t"\nos="tiny"\ncommand="sh main.sh"\nfiles=["main.sh","data/"]\n',
                 base_dir=base)  # fmt: skip
    archive = _tar(task)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert sorted(tar.getnames()) == ["data", "data/x", "main.sh"]
        assert tar.extractfile("main.sh").read() == b"echo hi\n"  # type: ignore[union-attr]
        assert tar.getmember("main.sh").mode == 0o644
    assert _tar(task) == archive  # deterministic
    (base / "run.sh").write_text("exit 0\n")
    (base / "run.sh").chmod(0o700)
    (base / "inner").symlink_to("main.sh")
    kept = loads('name="t"\nos="tiny"\ncommand="true"\nfiles=["run.sh","inner"]\n', base_dir=base)
    with tarfile.open(fileobj=io.BytesIO(_tar(kept))) as tar:
        assert tar.getmember("run.sh").mode == 0o755  # executable bit kept, nothing else
        assert tar.getmember("inner").issym()
        assert tar.getmember("inner").linkname == "main.sh"
    (base / "link").symlink_to(tmp_path / "secret")
    sneaky = loads('name="t"\nos="tiny"\ncommand="true"\nfiles=["link"]\n', base_dir=base)
    with pytest.raises(TaskFileError, match="outside"):
        _tar(sneaky)


def test_lending_policy_from_the_worker_config() -> None:
    from node.config import WorkerConfig

    config = WorkerConfig(
        limits={"max_vcpus": 2, "max_cpu_share": 2.0, "max_memory": 512 << 20},
        max_concurrent_vms=2,
    )
    policy = LendingPolicy.of(config)
    assert (policy.ceilings["memory_mib"], policy.max_concurrent_vms) == (512, 2)
    room = policy.remaining([Caps(memory_mib=128)])
    assert room is not None
    # What a VM costs the host beyond its memory counts too: 512 - (128 + 64) - 64.
    assert room.memory_mib == 512 - 128 - 2 * VM_OVERHEAD_MIB


def test_live_logs_are_kept_for_a_bounded_number_of_tasks() -> None:
    service = SchedulerService.__new__(SchedulerService)  # only its log buffers are used here
    service.logs = {}
    for n in range(MAX_LOG_TASKS + 10):
        service.log_buffer(f"t{n}").add(LeaseKey(f"t{n}", 0, 1), "stdout", b"x")
    service.log_buffer("t10")  # read recently: kept
    service.log_buffer(f"t{MAX_LOG_TASKS + 10}")
    assert len(service.logs) == MAX_LOG_TASKS
    assert "t10" in service.logs
    assert "t11" not in service.logs  # the least recently used went first
