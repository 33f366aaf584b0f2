"""The task file: what an owner writes to describe one task (TOML).

Schema (every key but ``name``, ``os`` (or ``image``) and ``command`` is optional; unknown keys
are refused)::

    name     = "hello"                   # [a-z0-9][a-z0-9._-]*, at most 64 characters
    os       = "debian-12"               # an OS of the catalog: "tiny" or "debian-12"
    image    = "hello@1"                 # instead of os, packages and files: a ready image, by
                                         # its image ID (64 hex digits) or the name[@version] of
                                         # a catalog image entry; it runs this file's command
                                         # (env added to the image's; cwd default the image's)
                                         # with no assembly
    packages = ["python3", "./vendor"]   # Debian package names of that OS's archive (together
                                         # one layer, with what they need that the OS lacks), or
                                         # local directories (contain a "/", relative to this
                                         # file; each a layer, as the guest's / sees it, above
                                         # the Debian one, the last listed highest)
    command  = "python3 -c 'print(6*7)'" # a string runs under /bin/sh -c; an array is the argv
    env      = { GREETING = "hi" }       # names [A-Za-z_][A-Za-z0-9_]*, string values
    files    = ["main.py", "data/"]      # relative to this file; land in the guest under
                                         # /task/<same path> (directories recursively)
    cwd      = "/task"                   # absolute; default /task when there are files, else /
    replicas = 1                         # run on this many workers ...
    quorum   = 1                         # ... and accept when this many agree (<= replicas)

    [resources]
    cpus      = 1                        # vCPUs
    cpu_share = 1.0                      # host CPUs the whole VM may use (default: cpus)
    memory    = "256MiB"                 # sizes as in node.toml (node.units.parse_size)
    disk      = "256MiB"                 # the writable scratch disk
    disk_rate = "0"                      # bytes/s, "0" is unlimited (node.units.parse_rate)
    network   = "none"                   # "none" or "proxy" (the worker's egress proxy only)
    allow     = ["pypi.org:443"]         # what the proxy may reach (network = "proxy" only)

    [limits]
    max_runtime  = "10m"                 # per attempt (node.units.parse_duration)
    deadline     = "1h"                  # after submission; or an offset datetime (RFC 3339)
    max_attempts = 3

    [placement]
    workers = ["12D3KooW..."]            # only these workers (peer IDs) may run the task; the
                                         # owner vouches for them, so one of them may decide a
                                         # quorum alone; default: any worker

An invalid file raises :class:`catalog.errors.TaskFileError` naming the file, the line and the key
at fault. tomllib reports lines only for syntax errors, so for everything else the line is found
by scanning the text for the key (:func:`find_key_line`).
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from catalog.caps import Caps
from catalog.errors import TaskFileError
from node.limits import LIMITS, Amounts, Limit, Unit, limit_named
from node.units import format_size, parse_duration, parse_rate, parse_size

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Debian policy 5.6.1: lowercase letters, digits, + - . ; at least two characters.
DEBIAN_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
TASK_DIR = "/task"
MAX_FILE_SIZE = 1 << 20
MIB = 1024 * 1024

_TOP_KEYS = {
    "name",
    "os",
    "packages",
    "command",
    "env",
    "files",
    "cwd",
    "resources",
    "limits",
    "replicas",
    "quorum",
    "image",
    "placement",
}
_NOT_WITH_IMAGE = ("os", "packages", "files")
IMAGE_REF_RE = re.compile(r"[0-9a-f]{64}|[a-z0-9][a-z0-9._-]{0,63}(@[A-Za-z0-9._+-]{1,64})?")
# The limits a task file sets, by their [resources] keys, in the order of the table of limits.
TASK_LIMITS = {limit.task_key: limit for limit in LIMITS if limit.task_key is not None}
_RESOURCE_KEYS = {*TASK_LIMITS, "network", "allow"}
_LIMIT_KEYS = {"max_runtime", "deadline", "max_attempts"}
_PLACEMENT_KEYS = {"workers"}
MAX_PLACEMENT_WORKERS = 64
# A libp2p peer ID as vmlend writes them (Ed25519 identity multihash, or a legacy sha256 one).
_B58 = "[1-9A-HJ-NP-Za-km-z]"
PEER_ID_RE = re.compile(f"(?:12D3KooW{_B58}{{44}}|Qm{_B58}{{44}})")
_NETWORKS = ("none", "proxy")


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """``[resources]``: the amount of each limit in :data:`TASK_LIMITS` by its task-file key, as
    written (sizes in bytes, rates in bytes/s; a key not given keeps its default), and the
    network."""

    amounts: Mapping[str, float] = field(default_factory=dict)
    network: str = "none"
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        amounts = dict(self.amounts)
        for key, limit in TASK_LIMITS.items():
            if key not in amounts:
                amounts[key] = _default_amount(limit, amounts)
        if amounts.keys() != TASK_LIMITS.keys():
            raise ValueError(f"no limit has the key {', '.join(amounts.keys() - TASK_LIMITS)}")
        object.__setattr__(self, "amounts", Amounts(amounts))


def _default_amount(limit: Limit, before: Mapping[str, float]) -> float:
    """What a task that does not name ``limit`` asks, ``before`` holding the amounts of the limits
    before it: the amount of the limit it may not exceed (a CPU share: the vCPUs), or else the
    caps' default."""
    bound_key = _bound_key(limit)
    if bound_key is not None:
        return limit.typed(before[bound_key])
    return limit.to_written(Caps().amount(limit.name))


def _bound_key(limit: Limit) -> str | None:
    """The task-file key of the limit ``limit`` may not exceed, if a task file sets that one."""
    return None if limit.at_most is None else limit_named(limit.at_most).task_key


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    max_runtime: float = 600.0
    deadline: float | dt.datetime | None = None
    """Seconds after submission, an absolute (offset-aware) time, or none."""
    max_attempts: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFile:
    name: str
    os: str
    command: tuple[str, ...]
    packages: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    cwd: str = "/"
    resources: Resources = field(default_factory=Resources)
    limits: Limits = field(default_factory=Limits)
    replicas: int = 1
    quorum: int = 1
    base_dir: Path = Path(".")
    """The directory ``files`` and local package directories are relative to."""
    image: str = ""
    """A ready image (ID or catalog image entry name[@version]); then ``os`` is empty."""
    workers: tuple[str, ...] = ()
    """``[placement] workers``: the only peers that may run it (sorted; empty: any)."""

    @property
    def debian_packages(self) -> tuple[str, ...]:
        return tuple(p for p in self.packages if not is_local_package(p))

    @property
    def local_packages(self) -> tuple[Path, ...]:
        return tuple(self.base_dir / p for p in self.packages if is_local_package(p))


def is_local_package(spec: str) -> bool:
    """A package spec naming a directory rather than a Debian package."""
    return "/" in spec


def load(path: Path) -> TaskFile:
    """Read and validate the task file at ``path``."""
    return loads(read(path), source=str(path), base_dir=path.parent)


def read(path: Path) -> str:
    """The text of the task file at ``path``, or a :class:`TaskFileError` saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError("no such task file", source=str(path)) from None
    except IsADirectoryError:
        raise TaskFileError("a directory, not a task file", source=str(path)) from None
    except OSError as e:
        raise TaskFileError(f"cannot read it: {e.strerror or e}", source=str(path)) from None
    except UnicodeDecodeError:
        raise TaskFileError("not UTF-8 text (a task file is TOML)", source=str(path)) from None


def loads(text: str, *, source: str = "<task>", base_dir: Path = Path(".")) -> TaskFile:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise TaskFileError(str(e), source=source, line=int(m[1]) if m else None, key=None) from e
    return _Parser(text, source, base_dir).task(raw)


def from_table(raw: Mapping[str, Any], *, source: str, base_dir: Path) -> TaskFile:
    """A task from the same table a task file holds, built by a program (``vmlend run``) rather
    than written as TOML; the same rules apply, and errors name the key without a line."""
    return _Parser("", source, base_dir).task(dict(raw))


class _Parser:
    def __init__(self, text: str, source: str, base_dir: Path) -> None:
        self.text = text
        self.source = source
        self.base_dir = base_dir

    def fail(self, key: tuple[str, ...], message: str) -> TaskFileError:
        return TaskFileError(
            message, source=self.source, line=find_key_line(self.text, key), key=".".join(key)
        )

    def check_keys(self, table: Mapping[str, Any], allowed: set[str], at: tuple[str, ...]) -> None:
        for k in table:
            if k not in allowed:
                raise self.fail((*at, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def typed(
        self, table: Mapping[str, Any], key: tuple[str, ...], kind: type, default: Any
    ) -> Any:
        value = table.get(key[-1], default)
        # bool is an int in Python; a task file saying cpus = true is a mistake.
        if value is not default and (
            not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool))
        ):
            want = {
                str: "a string",
                int: "an integer",
                float: "a number",
                list: "an array",
                dict: "a table",
            }[kind]
            raise self.fail(key, f"must be {want}, not {type(value).__name__}")
        return value

    def task(self, raw: dict[str, Any]) -> TaskFile:
        self.check_keys(raw, _TOP_KEYS, ())
        image = self.image(raw)
        for required in ("name", "command") if image else ("name", "os", "command"):
            if required not in raw:
                raise TaskFileError(
                    f"missing required key {required!r}",
                    source=self.source,
                    line=None,
                    key=required,
                )
        name = self.typed(raw, ("name",), str, None)
        if not NAME_RE.fullmatch(name):
            raise self.fail(("name",), f"{name!r} is not a task name ({NAME_RE.pattern})")
        os_name = self.typed(raw, ("os",), str, "")
        if not image and not NAME_RE.fullmatch(os_name):
            raise self.fail(("os",), f"{os_name!r} is not an OS name")
        files = self.files(raw)
        # With a ready image, no cwd means the image's own ("").
        cwd = self.typed(raw, ("cwd",), str, TASK_DIR if files else "" if image else "/")
        if not (cwd.startswith("/") or (image and "cwd" not in raw)):
            raise self.fail(("cwd",), f"must be an absolute path, not {cwd!r}")
        replicas = self.positive(raw, ("replicas",), 1)
        quorum = self.positive(raw, ("quorum",), 1)
        if quorum > replicas:
            raise self.fail(("quorum",), f"quorum {quorum} exceeds replicas {replicas}")
        return TaskFile(
            name=name,
            os=os_name,
            command=self.command(raw),
            packages=self.packages(raw),
            env=self.env(raw),
            files=files,
            cwd=cwd,
            resources=self.resources(self.typed(raw, ("resources",), dict, {})),
            limits=self.limits(self.typed(raw, ("limits",), dict, {})),
            replicas=replicas,
            quorum=quorum,
            base_dir=self.base_dir,
            image=image,
            workers=self.placement(self.typed(raw, ("placement",), dict, {})),
        )

    def placement(self, table: Mapping[str, Any]) -> tuple[str, ...]:
        self.check_keys(table, _PLACEMENT_KEYS, ("placement",))
        key = ("placement", "workers")
        workers: list[Any] = self.typed(table, key, list, [])
        if len(workers) > MAX_PLACEMENT_WORKERS:
            raise self.fail(key, f"at most {MAX_PLACEMENT_WORKERS} workers")
        for worker in workers:
            if not isinstance(worker, str) or not PEER_ID_RE.fullmatch(worker):
                raise self.fail(key, f"{str(worker)[:80]!r} is not a peer ID like 12D3KooW...")
        if "workers" in table and not workers:
            raise self.fail(key, "an empty list would let no worker run the task; leave it out")
        return tuple(sorted(set(workers)))

    def image(self, raw: Mapping[str, Any]) -> str:
        if "image" not in raw:
            return ""
        ref: str = self.typed(raw, ("image",), str, None)
        if not IMAGE_REF_RE.fullmatch(ref):
            raise self.fail(
                ("image",), f"{ref!r} is neither an image ID (64 hex digits) nor NAME[@VERSION]"
            )
        for key in _NOT_WITH_IMAGE:
            if key in raw:
                raise self.fail((key,), f"{key!r} cannot be given with 'image' (the image has it)")
        return ref

    def positive(self, table: Mapping[str, Any], key: tuple[str, ...], default: int) -> int:
        value: int = self.typed(table, key, int, default)
        if value < 1:
            raise self.fail(key, f"must be >= 1, not {value}")
        return value

    def strings(self, raw: Mapping[str, Any], key: tuple[str, ...]) -> list[str]:
        items = self.typed(raw, key, list, [])
        for item in items:
            if not isinstance(item, str) or not item:
                raise self.fail(key, f"every item must be a non-empty string, not {item!r}")
        if len(set(items)) != len(items):
            raise self.fail(key, "an item appears twice")
        return list(items)

    def command(self, raw: Mapping[str, Any]) -> tuple[str, ...]:
        value = raw["command"]
        if isinstance(value, str):
            if not value.strip():
                raise self.fail(("command",), "must not be empty")
            return ("/bin/sh", "-c", value)
        if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
            return tuple(value)
        raise self.fail(("command",), "must be a string or a non-empty array of strings")

    def packages(self, raw: Mapping[str, Any]) -> tuple[str, ...]:
        items = self.strings(raw, ("packages",))
        for item in items:
            if is_local_package(item):
                path = self.base_dir / item
                if not path.is_dir():
                    raise self.fail(("packages",), f"{item!r}: no such directory ({path})")
            elif not DEBIAN_PACKAGE_RE.fullmatch(item):
                raise self.fail(("packages",), f"{item!r} is not a Debian package name")
        return tuple(items)

    def env(self, raw: Mapping[str, Any]) -> dict[str, str]:
        table = self.typed(raw, ("env",), dict, {})
        for k, v in table.items():
            if not ENV_NAME_RE.fullmatch(k):
                raise self.fail(("env", k), f"{k!r} is not an environment variable name")
            if not isinstance(v, str):
                raise self.fail(("env", k), f"must be a string, not {type(v).__name__}")
        return dict(sorted(table.items()))

    def files(self, raw: Mapping[str, Any]) -> tuple[str, ...]:
        items = self.strings(raw, ("files",))
        for item in items:
            rel = PurePosixPath(item)
            if rel.is_absolute() or ".." in rel.parts or str(rel) == ".":
                raise self.fail(("files",), f"{item!r} must be a relative path inside the task dir")
            if not (self.base_dir / rel).exists():
                raise self.fail(("files",), f"{item!r}: no such file ({self.base_dir / rel})")
        return tuple(str(PurePosixPath(i)) for i in items)

    def resources(self, table: Mapping[str, Any]) -> Resources:
        at = ("resources",)
        self.check_keys(table, _RESOURCE_KEYS, at)
        amounts: dict[str, float] = {}
        for key, limit in TASK_LIMITS.items():
            amounts[key] = self.amount(table, (*at, key), limit, amounts)
        network = self.typed(table, (*at, "network"), str, "none")
        if network not in _NETWORKS:
            raise self.fail((*at, "network"), f"must be one of {', '.join(_NETWORKS)}")
        allow = self.strings(table, (*at, "allow"))
        if allow and network != "proxy":
            raise self.fail((*at, "allow"), 'needs network = "proxy"')
        return Resources(amounts=amounts, network=network, allow=tuple(allow))

    def amount(
        self,
        table: Mapping[str, Any],
        key: tuple[str, ...],
        limit: Limit,
        before: Mapping[str, float],
    ) -> float:
        """The amount of ``limit`` the table asks for, as written; ``before`` holds the amounts
        of the limits before it in the table of limits (so the one it may not exceed)."""
        default = _default_amount(limit, before)
        bound_key = _bound_key(limit)
        bound = None if bound_key is None else before[bound_key]
        if limit.unit is Unit.SHARE:
            share = table.get(key[-1], default)
            if isinstance(share, bool) or not isinstance(share, int | float):
                raise self.fail(key, f"must be a number, not {share!r}")
            if not 0 < share <= (limit.most if bound is None else bound):
                where = limit.most if bound is None else f"{bound_key}={bound}"
                raise self.fail(key, f"must be in (0, {where}], not {share}")
            return float(share)
        if limit.unit in (Unit.SIZE, Unit.RATE):
            parse = parse_size if limit.unit is Unit.SIZE else parse_rate
            value: int = self.unit(table, key, parse, default)
            least = int(limit.to_written(limit.least))
            if value < least:
                raise self.fail(key, f"must be at least {format_size(least)}")
        else:
            value = self.typed(table, key, int, int(default))
            if value < limit.least:
                raise self.fail(key, f"must be >= {limit.least}, not {value}")
        if bound is not None and value > bound:
            raise self.fail(key, f"must be at most {bound_key} ({bound}), not {value}")
        return value

    def unit(self, table: Mapping[str, Any], key: tuple[str, ...], parse: Any, default: Any) -> Any:
        value = table.get(key[-1])
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a bare number is bytes / seconds
        if not isinstance(value, str):
            raise self.fail(key, f'must be a string like "256MiB" or "10m", not {value!r}')
        try:
            return parse(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from e

    def limits(self, table: Mapping[str, Any]) -> Limits:
        at = ("limits",)
        self.check_keys(table, _LIMIT_KEYS, at)
        runtime = self.unit(table, (*at, "max_runtime"), parse_duration, 600.0)
        if runtime < 1:
            raise self.fail((*at, "max_runtime"), "must be at least 1s")
        deadline_raw = table.get("deadline")
        deadline: float | dt.datetime | None
        if isinstance(deadline_raw, dt.datetime):
            if deadline_raw.tzinfo is None:
                raise self.fail((*at, "deadline"), "a datetime needs a UTC offset (e.g. Z)")
            deadline = deadline_raw
        else:
            deadline = self.unit(table, (*at, "deadline"), parse_duration, None)
            if deadline is not None and deadline < runtime:
                raise self.fail((*at, "deadline"), "is shorter than max_runtime")
        return Limits(
            max_runtime=runtime,
            deadline=deadline,
            max_attempts=self.positive(table, (*at, "max_attempts"), 3),
        )


_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


def find_key_line(text: str, key: tuple[str, ...]) -> int | None:
    """The 1-based line where ``key`` (a path of table names and a key) is set in TOML ``text``.

    Handles ``[table]`` headers, dotted keys and inline tables; a key that is not written
    anywhere (a missing one) gives the line of its nearest written parent, or None.
    """
    best: tuple[int, int] | None = None  # (how much of the path matched, line)
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER_RE.match(line)
        if header:
            table = _split_key(header[1])
            if key[: len(table)] == table and (best is None or len(table) > best[0]):
                best = (len(table), number)
            continue
        m = _KEY_RE.match(line)
        if not m:
            continue
        full = table + _split_key(m[1])
        depth = 0
        while depth < min(len(full), len(key)) and full[depth] == key[depth]:
            depth += 1
        if depth < min(len(full), len(key)):
            continue  # a different key
        if depth == len(full) < len(key):
            # An inline table: does the rest of the path appear on this line?
            rest = line[m.end() :]
            if all(re.search(rf"(^|[\s{{,]){re.escape(k)}\s*=", rest) for k in key[depth:]):
                depth = len(key)
        if depth > len(table) and (best is None or depth > best[0]):
            best = (depth, number)
    return best[1] if best else None
