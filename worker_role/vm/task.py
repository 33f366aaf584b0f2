"""The host's side of the guest contract, without I/O: the task disk it writes, the result disk it
reads. The guest's side is ``worker_role/guest/init.sh``."""

from __future__ import annotations

import io
import re
import shlex
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from worker_role.errors import VmError

TASK_SERIAL = "vmlend-task"
SCRATCH_SERIAL = "vmlend-scratch"
RESULT_SERIAL = "vmlend-result"
LAYER_SERIAL = "vmlend-layer{}"
STDOUT_PORT = "vmlend.stdout"
STDERR_PORT = "vmlend.stderr"
CONTROL_PORT = "vmlend.control"
# The tar of /out starts here on the result disk; the header sector comes first.
RESULT_TAR_OFFSET = 4096
# Where the proxy appears inside the guest (QEMU user-mode network, guestfwd).
PROXY_GUEST_ADDR = "10.0.2.100"
PROXY_GUEST_PORT = 3128
# What the guest writes at the end of stdout and stderr (then a per-VM hex token) once the result
# is on disk. It starts with NUL ESC, which text output does not end with, so the host need not
# hold back live output in case it is the start of a marker.
END_MARKER_PREFIX = b"\0\x1bVMLEND-END-"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER = re.compile(rb"VMLEND1 exit=(-?\d+) timeout=([01]) out=([01])\n")


class LayerFormat(StrEnum):
    SQUASHFS = "squashfs"
    EROFS = "erofs"


@dataclass(frozen=True, slots=True)
class Layer:
    """A read-only file system image, shared by every VM that uses it."""

    path: Path
    format: LayerFormat = LayerFormat.SQUASHFS


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestCommand:
    """What the guest runs: command line, environment, directory and time limit. ``timeout_s``
    is enforced by the guest (exit 124) and, with a boot allowance on top, by the host, which
    destroys a guest that overruns."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    timeout_s: int = 60

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("a task needs a command")
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")
        for name in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"bad environment variable name {name!r}")
        if not self.cwd.startswith("/"):
            raise ValueError(f"cwd must be absolute, got {self.cwd!r}")


def run_script(spec: GuestCommand, *, extra_env: Mapping[str, str] = {}) -> str:
    """The shell script the guest runs in the task's root: cwd, a clean environment, the command."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    env.update(extra_env)
    env.update(spec.env)
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    argv = " ".join(shlex.quote(a) for a in spec.argv)
    cwd = shlex.quote(spec.cwd)
    return f"mkdir -p {cwd} && cd {cwd} || exit 127\nexec env -i {assigns} {argv}\n"


def task_archive(
    spec: GuestCommand, layers: Sequence[Layer], *, network: bool, end_token: bytes = b""
) -> bytes:
    """The task disk: a tar the guest unpacks. Deterministic (fixed mtimes, owners, order).

    ``end_token`` (hex) is what the guest writes, after END_MARKER_PREFIX, at the end of stdout
    and stderr once the result is on the result disk; empty for none.
    """
    if end_token and not re.fullmatch(rb"[0-9a-f]+", end_token):
        raise ValueError("end_token must be lowercase hex")
    extra = {}
    if network:
        proxy = f"http://{PROXY_GUEST_ADDR}:{PROXY_GUEST_PORT}"
        extra = {name: proxy for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    config = (
        f"TIMEOUT={spec.timeout_s}\n"
        f"LAYERS={shlex.quote(' '.join(layer.format.value for layer in layers))}\n"
        f"NET={1 if network else 0}\n"
        f"END={end_token.decode()}\n"
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, text in (("config", config), ("run.sh", run_script(spec, extra_env=extra))):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class GuestResult:
    """What the guest reported: the command's exit code (124 on timeout) and the /out archive."""

    exit_code: int
    timed_out: bool
    out_tar: bytes | None
    """The tar of /out, or None when it did not fit on the result disk."""


def parse_result(disk: bytes) -> GuestResult | None:
    """Read the result disk; None when the guest never wrote a result (it crashed or hung)."""
    m = _HEADER.match(disk[:512])
    if m is None:
        return None
    out_tar = None if m[3] == b"1" else _tar_prefix(disk[RESULT_TAR_OFFSET:])
    return GuestResult(exit_code=int(m[1]), timed_out=m[2] == b"1", out_tar=out_tar)


def read_result(path: Path) -> GuestResult | None:
    """:func:`parse_result` on the result disk file, reading only the header and the archive."""
    with path.open("rb") as f:
        head = f.read(RESULT_TAR_OFFSET)
        m = _HEADER.match(head[:512])
        if m is None or m[3] == b"1":
            return parse_result(head)
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:  # starts at RESULT_TAR_OFFSET
                tar.getmembers()
                end = tar.offset
        except tarfile.TarError as e:
            raise VmError(f"guest wrote a malformed /out archive: {e}") from e
        f.seek(RESULT_TAR_OFFSET)
        archive = f.read(end - RESULT_TAR_OFFSET)
    return parse_result(head + archive + b"\0" * 1024)


def _tar_prefix(data: bytes) -> bytes:
    """The tar archive at the start of ``data``, cut after its last member."""
    buf = io.BytesIO(data)
    try:
        with tarfile.open(fileobj=buf, mode="r:") as tar:
            members = tar.getmembers()
            end = tar.offset
    except tarfile.TarError as e:
        raise VmError(f"guest wrote a malformed /out archive: {e}") from e
    del members
    return data[:end] + b"\0" * 1024
