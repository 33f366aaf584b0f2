"""``vmlend version``: the versions that matter in a bug report, found without importing the
heavy libraries they describe (package metadata and the tools' own ``--version``), so the
command answers in a fraction of a second even where libvirt or QEMU is missing."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

import node

ROOT = Path(__file__).resolve().parents[1]
TOOL_TIMEOUT = 5.0
PACKAGES = {  # what the report calls it -> the distribution's name
    "py-libp2p": "libp2p",
    "trio": "trio",
    "libvirt-python": "libvirt-python",
    "msgpack": "msgpack",
}
TOOLS = {  # what the report calls it -> the command that prints its version
    "libvirt": ["libvirtd", "--version"],
    "qemu": ["qemu-system-x86_64", "--version"],
}


def report() -> dict[str, str | None]:
    """Each item's version, or None where it is not installed (said as such, not guessed)."""
    found: dict[str, str | None] = {
        "vmlend": node.__version__,
        "commit": _commit(),
        "python": platform.python_version(),
    }
    for name, dist in PACKAGES.items():
        try:
            found[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    for name, argv in TOOLS.items():
        found[name] = _tool_version(argv)
    found["kernel"] = platform.release()
    found["os"] = _os_name()
    return found


def _tool_version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\d+\.\d+(\.\d+)?", done.stdout)
    return m[0] if done.returncode == 0 and m else None


def _commit() -> str | None:
    """The source checkout's commit, read from .git (no git binary needed), if there is one."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12] or None
        ref = head.removeprefix("ref: ")
        loose = git / ref
        if loose.is_file():
            return loose.read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        return None
    return None


def _os_name() -> str | None:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?$', text, re.MULTILINE)
    return m[1] if m else None


def print_report(as_json: bool) -> int:
    import json

    found = report()
    if as_json:
        print(json.dumps(found))
        return 0
    for name, value in found.items():
        print(f"{name + ':':<16}{value if value is not None else 'not found'}")
    return 0
