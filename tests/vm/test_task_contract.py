"""The host's half of the guest contract, without a VM: the task disk, the script, the result."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_role.vm.task import (
    RESULT_TAR_OFFSET,
    GuestCommand,
    Layer,
    LayerFormat,
    parse_result,
    read_result,
    run_script,
    task_archive,
)

ARG = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)


@settings(max_examples=40, deadline=None)
@given(argv=st.lists(ARG, min_size=1, max_size=4), value=ARG)
def test_script_passes_argv_and_env_exactly(argv: list[str], value: str) -> None:
    # The generated script, run by a real sh, hands the command its argv and env byte for byte.
    spec = GuestCommand(argv=("printf", "%s\\0", *argv, value), env={"V": value}, cwd="/")
    script = run_script(spec)
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [a.encode() for a in (*argv, value)]
    env_out = subprocess.run(
        ["sh", "-c", run_script(GuestCommand(argv=("env",), env={"V": value}))],
        capture_output=True,
        check=True,
    ).stdout
    assert f"V={value}\n".encode() in env_out


def test_script_runs_in_cwd_with_a_clean_environment() -> None:
    script = run_script(GuestCommand(argv=("sh", "-c", "pwd; echo ${LEAK-unset}"), cwd="/tmp"))
    out = subprocess.run(
        ["sh", "-c", script], capture_output=True, check=True, env={"LEAK": "yes", "PATH": "/bin"}
    ).stdout
    assert out == b"/tmp\nunset\n"


def test_task_archive_is_deterministic_and_carries_config() -> None:
    spec = GuestCommand(argv=("true",), timeout_s=42)
    layers = [Layer(Path("/x")), Layer(Path("/y"), LayerFormat.EROFS)]
    a = task_archive(spec, layers, network=True)
    assert a == task_archive(spec, layers, network=True)
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        config = tar.extractfile("config").read().decode()  # type: ignore[union-attr]
        script = tar.extractfile("run.sh").read().decode()  # type: ignore[union-attr]
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    assert "TIMEOUT=42\n" in config
    assert "LAYERS='squashfs erofs'\n" in config
    assert "NET=1\n" in config
    assert "http_proxy=http://10.0.2.100:3128" in script
    assert "http_proxy" not in task_archive(spec, [], network=False).decode("latin1")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (dict(argv=()), "command"),
        (dict(argv=("x",), timeout_s=0), "timeout"),
        (dict(argv=("x",), env={"A B": "1"}), "environment"),
        (dict(argv=("x",), cwd="rel"), "absolute"),
    ],
)
def test_bad_task_specs_are_refused(spec: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        GuestCommand(**spec)  # type: ignore[arg-type]


def _disk(header: bytes, tar: bytes = b"") -> bytes:
    return header.ljust(RESULT_TAR_OFFSET, b"\0") + tar + b"\0" * 8192


def test_result_disk_parsing() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("./f")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    r = parse_result(_disk(b"VMLEND1 exit=3 timeout=0 out=0\n", buf.getvalue()))
    assert r is not None
    assert (r.exit_code, r.timed_out) == (3, False)
    assert r.out_tar is not None
    with tarfile.open(fileobj=io.BytesIO(r.out_tar)) as tar:
        assert tar.extractfile("./f").read() == b"abc"  # type: ignore[union-attr]
    timed = parse_result(_disk(b"VMLEND1 exit=124 timeout=1 out=1\n"))
    assert timed is not None
    assert timed.timed_out
    assert timed.out_tar is None
    assert parse_result(_disk(b"")) is None  # the guest never reported
    assert parse_result(_disk(b"VMLEND1 exit=x timeout=0 out=0\n")) is None


def test_result_disk_file_is_read_without_reading_it_all(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("./big")
        info.size = 100_000
        tar.addfile(info, io.BytesIO(b"z" * 100_000))
    disk = tmp_path / "result.img"
    disk.write_bytes(_disk(b"VMLEND1 exit=0 timeout=0 out=0\n", buf.getvalue()))
    with disk.open("r+b") as f:
        f.truncate(64 << 20)  # sparse, like the real one
    r = read_result(disk)
    assert r is not None
    assert r.out_tar is not None
    assert len(r.out_tar) < 200_000
    with tarfile.open(fileobj=io.BytesIO(r.out_tar)) as tar:
        assert tar.extractfile("./big").read() == b"z" * 100_000  # type: ignore[union-attr]
    assert read_result(tmp_path / "result.img") == r
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"\0" * 8192)
    assert read_result(empty) is None
