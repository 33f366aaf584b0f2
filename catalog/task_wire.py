"""A parsed task as it travels from an owner's node to a scheduler, and back into a TaskFile.

The owner parses its task file once (:mod:`catalog.taskfile`); what crosses the network is that
typed task, not TOML. Every path in it is relative and stays inside the directory the *receiver*
chooses: the files and local package directories travel as one archive that the receiver
unpacks there, so a remote task never names a path on the machine that receives it.
:func:`task_from_wire` checks every field of what a peer sent (types, grammars, sizes) and raises
:class:`LocalProtocolError`, which the receiving glue reports as the peer's fault.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from catalog.taskfile import (
    DEBIAN_PACKAGE_RE,
    ENV_NAME_RE,
    IMAGE_REF_RE,
    MAX_PLACEMENT_WORKERS,
    NAME_RE,
    PEER_ID_RE,
    TASK_LIMITS,
    Limits,
    Resources,
    TaskFile,
    is_local_package,
)
from node.errors import LocalProtocolError
from node.limits import Limit, Unit, limit_named
from node.wire_fields import as_int, as_map, as_text, as_tuple, check_keys

MAX_ARGS = 1024
MAX_ARG = 64 * 1024
MAX_ENV = 256
MAX_PATHS = 256
MAX_PATH = 1024
MAX_ALLOW = 64
MAX_RUNTIME = 30 * 24 * 3600.0


_KEYS = {
    "name", "os", "image", "command", "packages", "env", "files", "cwd", "resources", "limits",
    "replicas", "quorum",
}  # fmt: skip
_OPTIONAL_KEYS = frozenset({"workers"})  # owners before [placement] did not send it
_RESOURCE_KEYS = {*TASK_LIMITS, "network", "allow"}
# The most a task may state of a limit written in bytes (a size, a rate).
MAX_BYTES = 2**50
_LIMIT_KEYS = {"max_runtime", "deadline", "deadline_at", "max_attempts"}


def task_to_wire(task: TaskFile) -> dict[str, Any]:
    """The task as a msgpack-ready map; its ``base_dir`` stays here."""
    r, lim = task.resources, task.limits
    deadline = lim.deadline
    return {
        "name": task.name,
        "os": task.os,
        "image": task.image,
        "command": list(task.command),
        "packages": [_portable(p) if is_local_package(p) else p for p in task.packages],
        "env": dict(task.env),
        "files": list(task.files),
        "cwd": task.cwd,
        "resources": {**r.amounts, "network": r.network, "allow": list(r.allow)},
        "limits": {
            "max_runtime": lim.max_runtime,
            "deadline": deadline if isinstance(deadline, float | int) else None,
            "deadline_at": deadline.timestamp() if isinstance(deadline, dt.datetime) else None,
            "max_attempts": lim.max_attempts,
        },
        "replicas": task.replicas,
        "quorum": task.quorum,
        "workers": list(task.workers),
    }


def task_from_wire(raw: object, *, base_dir: Path) -> TaskFile:
    """The task a peer sent, with its relative paths taken against ``base_dir`` (ours)."""
    value = as_map("task", raw)
    check_keys("task", value, _KEYS, _OPTIONAL_KEYS)
    name = _match("name", value["name"], NAME_RE)
    image = as_text("image", value["image"], 200)
    os_name = as_text("os", value["os"], 64)
    if image:
        _match("image", image, IMAGE_REF_RE)
        if os_name or value["packages"] or value["files"]:
            raise LocalProtocolError("a task with a ready image names no os, packages or files")
    else:
        _match("os", os_name, NAME_RE)
    command = as_tuple(
        "command", value["command"], MAX_ARGS, lambda a: as_text("argument", a, MAX_ARG)
    )
    if not command:
        raise LocalProtocolError("command must not be empty")
    packages = as_tuple("packages", value["packages"], MAX_PATHS, _package)
    files = as_tuple("files", value["files"], MAX_PATHS, lambda f: _relative("files", f))
    env = _env(value["env"])
    cwd = as_text("cwd", value["cwd"], MAX_PATH)
    if (cwd and not cwd.startswith("/")) or (not cwd and not image):
        raise LocalProtocolError("cwd must be an absolute path")
    replicas = as_int("replicas", value["replicas"], 1, 16)
    workers = as_tuple("workers", value.get("workers", []), MAX_PLACEMENT_WORKERS, _peer_id)
    quorum = as_int("quorum", value["quorum"], 1, replicas)
    for label, items in (("packages", packages), ("files", files)):
        if len(set(items)) != len(items):
            raise LocalProtocolError(f"{label}: an item appears twice")
    return TaskFile(
        name=name,
        os=os_name,
        command=command,
        packages=packages,
        env=env,
        files=files,
        cwd=cwd,
        resources=_resources(value["resources"]),
        limits=_limits(value["limits"]),
        replicas=replicas,
        quorum=quorum,
        base_dir=base_dir,
        image=image,
        workers=tuple(sorted(set(workers))),
    )


def _peer_id(raw: object) -> str:
    text = as_text("worker", raw, 64)
    if not PEER_ID_RE.fullmatch(text):
        raise LocalProtocolError(f"workers: {text[:80]!r} is not a peer ID")
    return text


def _resources(raw: object) -> Resources:
    value = as_map("resources", raw)
    check_keys("resources", value, _RESOURCE_KEYS, frozenset())
    amounts: dict[str, float] = {}
    for key, limit in TASK_LIMITS.items():
        amounts[key] = _amount(key, limit, value[key], amounts)
    network = value["network"]
    if network not in ("none", "proxy"):
        raise LocalProtocolError("network must be none or proxy")
    allow = as_tuple("allow", value["allow"], MAX_ALLOW, lambda a: as_text("allow", a, 300))
    if allow and network != "proxy":
        raise LocalProtocolError('allow needs network = "proxy"')
    return Resources(amounts=amounts, network=network, allow=allow)


def _amount(key: str, limit: Limit, raw: object, before: Mapping[str, float]) -> float:
    """The amount of ``limit`` as written, ``before`` holding the amounts of the limits before it
    in the table of limits (so the one it may not exceed)."""
    bound_key = None if limit.at_most is None else limit_named(limit.at_most).task_key
    high = None if bound_key is None else before[bound_key]
    if limit.unit is Unit.SHARE:
        share = _number(key, raw)
        if not 0 < share <= (limit.most if high is None else high):
            where = limit.most if high is None else f"{bound_key}={high}"
            raise LocalProtocolError(f"{key} must be in (0, {where}]")
        return share
    if limit.unit in (Unit.SIZE, Unit.RATE):
        amount = as_int(key, raw, int(limit.to_written(limit.least)), MAX_BYTES)
    else:
        amount = as_int(key, raw, limit.least, limit.most)
    if high is not None and amount > high:
        raise LocalProtocolError(f"{key} must be at most {bound_key} ({high})")
    return amount


def _limits(raw: object) -> Limits:
    value = as_map("limits", raw)
    check_keys("limits", value, _LIMIT_KEYS, frozenset())
    runtime = _number("max_runtime", value["max_runtime"])
    if not 1 <= runtime <= MAX_RUNTIME:
        raise LocalProtocolError(f"max_runtime must be in [1, {MAX_RUNTIME:.0f}] seconds")
    deadline: float | dt.datetime | None = None
    if value["deadline"] is not None:
        deadline = _number("deadline", value["deadline"])
        if deadline < runtime:
            raise LocalProtocolError("deadline is shorter than max_runtime")
    if value["deadline_at"] is not None:
        if deadline is not None:
            raise LocalProtocolError("a deadline is either relative or absolute")
        at = _number("deadline_at", value["deadline_at"])
        try:
            deadline = dt.datetime.fromtimestamp(at, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise LocalProtocolError("deadline_at is not a time") from None
    return Limits(
        max_runtime=runtime,
        deadline=deadline,
        max_attempts=as_int("max_attempts", value["max_attempts"], 1, 100),
    )


def _package(value: object) -> str:
    text = as_text("package", value, MAX_PATH)
    if is_local_package(text):
        rel = _relative("packages", text)
        return rel if is_local_package(rel) else f"./{rel}"
    if not DEBIAN_PACKAGE_RE.fullmatch(text):
        raise LocalProtocolError(f"{text!r} is not a Debian package name")
    return text


def _portable(spec: str) -> str:
    """A local package directory as the receiver will find it: relative, inside the task."""
    rel = str(PurePosixPath(spec))
    return rel if is_local_package(rel) else f"./{rel}"


def _relative(label: str, value: object) -> str:
    """A path inside the task directory: relative, no ``..``, not the directory itself."""
    text = as_text(label, value, MAX_PATH)
    rel = PurePosixPath(text)
    if not text or rel.is_absolute() or ".." in rel.parts or str(rel) == "." or "\0" in text:
        raise LocalProtocolError(f"{label}: {text!r} must be a relative path inside the task")
    return str(rel)


def _env(raw: object) -> dict[str, str]:
    value = as_map("env", raw)
    if len(value) > MAX_ENV:
        raise LocalProtocolError(f"env has more than {MAX_ENV} variables")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not ENV_NAME_RE.fullmatch(k) or len(k) > 256:
            raise LocalProtocolError(f"{k!r} is not an environment variable name")
        out[k] = as_text(f"env {k}", v, MAX_ARG)
    return dict(sorted(out.items()))


def _number(label: str, value: object) -> float:
    # A peer's True is not the number one.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LocalProtocolError(f"{label} must be a finite number")
    return float(value)


def _argument(value: object) -> str:
    return as_text("argument", value, MAX_ARG)


def _match(label: str, value: object, pattern: Any) -> str:
    text = as_text(label, value, 200)
    if not pattern.fullmatch(text):
        raise LocalProtocolError(f"{label}: {text!r} does not match {pattern.pattern}")
    return text


def archive_members(task: TaskFile) -> list[str]:
    """The relative paths the task's archive carries: its files and local package directories."""
    return [*task.files, *(str(PurePosixPath(p)) for p in task.packages if is_local_package(p))]


__all__ = ["archive_members", "task_from_wire", "task_to_wire"]
