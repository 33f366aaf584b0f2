"""The task file: the shipped examples load; every kind of invalid file names its line and key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from catalog import taskfile
from catalog.errors import TaskFileError
from catalog.taskfile import find_key_line, load, loads

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_load() -> None:
    hello = load(EXAMPLES / "hello.toml")
    assert hello.os == "tiny"
    assert hello.command == ("/bin/sh", "-c", "echo hello from $(uname -m)")
    assert hello.resources.amounts["memory"] == 128 * 1024 * 1024
    assert hello.limits.max_runtime == 30
    assert hello.cwd == "/"
    py = load(EXAMPLES / "python.toml")
    assert py.debian_packages == ("python3",)
    assert py.files == ("python/hello.py",)
    assert py.cwd == "/task"
    assert py.env == {"GREETING": "hello"}
    assert py.limits.deadline == 3600
    assert py.base_dir == EXAMPLES


def test_full_schema(tmp_path: Path) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "a.txt").write_text("a")
    text = """
name = "full"
os = "debian-12"
packages = ["python3", "./vendor"]
command = ["python3", "-V"]
env = { B = "2", A = "1" }
files = ["a.txt"]
cwd = "/work"
replicas = 3
quorum = 2

[resources]
cpus = 2
cpu_share = 0.5
memory = "1GiB"
disk = "2G"
disk_rate = "10MiB/s"
network = "proxy"
allow = ["pypi.org:443"]

[limits]
max_runtime = "5m"
deadline = 2030-01-01T00:00:00Z
max_attempts = 5
"""
    t = loads(text, base_dir=tmp_path)
    assert t.debian_packages == ("python3",)
    assert t.local_packages == (tmp_path / "./vendor",)
    assert list(t.env) == ["A", "B"]
    r = t.resources
    assert dict(r.amounts) == {
        "cpus": 2, "cpu_share": 0.5, "memory": 1 << 30, "disk": 2 << 30, "disk_rate": 10 << 20,
    }  # fmt: skip
    assert (r.network, r.allow) == ("proxy", ("pypi.org:443",))
    assert t.limits.deadline == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert (t.limits.max_runtime, t.limits.max_attempts, t.replicas, t.quorum) == (300, 5, 3, 2)


BASE = 'name = "t"\nos = "tiny"\ncommand = "true"\n'
IMAGE = 'name = "t"\nimage = "hello@1"\ncommand = "true"\n'


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        (BASE + "colour = 1\n", 4, "colour", "unknown key"),
        (BASE + "[resources]\ncpus = 1\nram = 5\n", 6, "resources.ram", "unknown key"),
        (BASE + '[resources]\n\nmemory = "lots"\n', 6, "resources.memory", "not a size"),
        (BASE + '[resources]\nmemory = "16MiB"\n', 5, "resources.memory", "at least 32MiB"),
        (BASE + "[resources]\ncpus = 0\n", 5, "resources.cpus", ">= 1"),
        (BASE + "[resources]\ncpus = true\n", 5, "resources.cpus", "an integer"),
        (BASE + "[resources]\ncpus = 1\ncpu_share = 2.0\n", 6, "resources.cpu_share", "(0, cpus"),
        (BASE + '[resources]\nnetwork = "wifi"\n', 5, "resources.network", "one of"),
        (BASE + '[resources]\nallow = ["a:1"]\n', 5, "resources.allow", "proxy"),
        (BASE + 'resources.disk = "x"\n', 4, "resources.disk", "not a size"),
        (BASE + 'resources = { cpus = 1, disk = "x" }\n', 4, "resources.disk", "not a size"),
        (BASE + '[limits]\nmax_runtime = "soon"\n', 5, "limits.max_runtime", "duration"),
        (BASE + '[limits]\nmax_runtime = "1h"\ndeadline = "1m"\n', 6, "limits.deadline", "shorter"),
        (BASE + "[limits]\ndeadline = 2030-01-01T00:00:00\n", 5, "limits.deadline", "offset"),
        (BASE + "replicas = 1\nquorum = 2\n", 5, "quorum", "exceeds"),
        (BASE + 'env = { 1X = "a" }\n', 4, "env.1X", "variable name"),
        (BASE + "env = { X = 1 }\n", 4, "env.X", "must be a string"),
        (BASE + 'packages = ["Python3!"]\n', 4, "packages", "Debian package name"),
        (BASE + 'packages = ["./nope"]\n', 4, "packages", "no such directory"),
        (BASE + 'files = ["../etc/passwd"]\n', 4, "files", "relative path"),
        (BASE + 'files = [\n  "missing.txt",\n]\n', 4, "files", "no such file"),
        ('name = "Bad Name"\nos = "tiny"\ncommand = "x"\n', 1, "name", "not a task name"),
        ('name = "t"\nos = "tiny"\ncommand = []\n', 3, "command", "non-empty array"),
        ('name = "t"\nos = 12\ncommand = "x"\n', 2, "os", "a string"),
        (IMAGE + 'os = "tiny"\n', 4, "os", "cannot be given with 'image'"),
        (IMAGE + 'packages = ["python3"]\n', 4, "packages", "cannot be given with 'image'"),
        (IMAGE + 'files = ["x"]\n', 4, "files", "cannot be given with 'image'"),
        ('name = "t"\ncommand = "x"\nimage = "Not An Image!"\n', 3, "image", "neither an image"),
        ('name = "t"\ncommand = "x"\nimage = 5\n', 3, "image", "a string"),
    ],
)
def test_invalid_names_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, fragment: str
) -> None:
    path = tmp_path / "task.toml"
    path.write_text(text)
    with pytest.raises(TaskFileError) as info:
        load(path)
    e = info.value
    assert (e.line, e.key) == (line, key), str(e)
    assert fragment in e.reason
    assert str(e).startswith(f"{path}:{line}: {key}: ")


def test_syntax_error_has_the_line(tmp_path: Path) -> None:
    path = tmp_path / "task.toml"
    path.write_text(BASE + "[resources\ncpus = 1\n")
    with pytest.raises(TaskFileError) as info:
        load(path)
    assert info.value.line == 4


def test_missing_required_key_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="missing required key 'command'"):
        loads('name = "t"\nos = "tiny"\n')
    with pytest.raises(TaskFileError, match=r"nope\.toml"):
        load(tmp_path / "nope.toml")


def test_find_key_line_prefers_the_deepest_match() -> None:
    text = "[limits]\nmax_attempts = 2\n\n[resources]\n# memory = 1\nmemory = '1G'\n"
    assert find_key_line(text, ("resources", "memory")) == 6
    assert find_key_line(text, ("resources", "disk")) == 4  # not written: its table's header
    assert find_key_line(text, ("nothing",)) is None
    assert taskfile.is_local_package("./x")
    assert not taskfile.is_local_package("python3")


def test_a_ready_image_instead_of_os_packages_files() -> None:
    t = loads(IMAGE)
    assert (t.image, t.os, t.packages, t.files, t.cwd) == ("hello@1", "", (), (), "")
    assert loads(IMAGE + 'cwd = "/task"\n').cwd == "/task"
    assert loads(f'name = "t"\nimage = "{"ab" * 32}"\ncommand = "x"\n').image == "ab" * 32
    with pytest.raises(TaskFileError, match="missing required key 'os'"):
        loads('name = "t"\ncommand = "x"\n')
    with pytest.raises(TaskFileError, match="missing required key 'command'"):
        loads('name = "t"\nimage = "hello"\n')
