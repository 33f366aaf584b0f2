"""The image manifest: everything a worker needs to boot a task's VM, named by its own hash.

Canonical bytes: a msgpack map with sorted keys, no floats (``cpu_share`` in thousandths)::

    {"v": 1, "os": str, "os_version": str,
     "kernel": hex blob ID, "initramfs": hex blob ID, "cmdline": str,
     "layers": [{"blob": hex, "format": "squashfs", "what": str}, ...],   # top first
     "caps": {"vcpus", "cpu_share_milli", "memory_mib", "disk_mib", "disk_bps": int,
              "network": "none" | "proxy", "net_allow": [str]},
     "command": [str, ...], "env": [[name, value], ...] (sorted), "cwd": str, "timeout_s": int}

The caps are the limits a task file sets (:data:`node.limits.LIMITS`); one added to those five
appears only when it is not its default, so adding it leaves every existing image ID alone.
The image ID is ``blake3(bytes)`` in hex. Layer order is the VM backend's (``Image.layers``:
top first), so the task layer comes first and the OS root last. A worker turns a manifest into
a bootable image by exporting each blob from its chunk store (:func:`materialize`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import msgpack
import trio

from catalog.blob import BlobStore, parse_blob_id
from catalog.caps import Caps, NetworkMode
from catalog.errors import ImageManifestError
from node.limits import LIMITS, Limit, Unit

VERSION = 1
MAX_MANIFEST_SIZE = 256 * 1024
MAX_IMAGE_SIZE = 16 << 30  # kernel, initramfs and layers together: what a worker fetches at most
MAX_LAYERS = 16  # the guest init's disks: one per layer, plus task, scratch and result
_HEX = re.compile(r"[0-9a-f]{64}")
_FORMATS = ("squashfs", "erofs")


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerRef:
    blob: str
    what: str
    format: str = "squashfs"


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageManifest:
    os: str
    os_version: str
    kernel: str
    initramfs: str
    cmdline: str
    layers: tuple[LayerRef, ...]
    caps: Caps
    """The task's own caps (``cpu_share`` in whole thousandths); a worker may only lower them."""
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    timeout_s: int

    def __post_init__(self) -> None:
        for blob in (self.kernel, self.initramfs, *(layer.blob for layer in self.layers)):
            if not _HEX.fullmatch(blob):
                raise ImageManifestError(f"not a blob ID: {blob!r}")
        if len(self.layers) > MAX_LAYERS:
            raise ImageManifestError(f"{len(self.layers)} layers; at most {MAX_LAYERS}")
        if any(layer.format not in _FORMATS for layer in self.layers):
            raise ImageManifestError("layer format must be squashfs or erofs")
        if not self.command or not self.cwd.startswith("/") or self.timeout_s < 1:
            raise ImageManifestError("a manifest needs a command, an absolute cwd, a timeout")
        c, default = self.caps, Caps()
        if any(c.amount(x.name) != default.amount(x.name) for x in LIMITS if x not in _RECORDED):
            raise ImageManifestError("manifest caps hold only what a task file sets")
        if any(round(c.amount(x.name) * 1000) != c.amount(x.name) * 1000 for x in _SHARES):
            raise ImageManifestError("manifest caps hold shares in whole thousandths")
        if list(self.env) != sorted(dict(self.env).items()):
            raise ImageManifestError("env must be sorted by name, each name once")

    def to_dict(self) -> dict[str, Any]:
        c = self.caps
        return {
            "v": VERSION,
            "os": self.os,
            "os_version": self.os_version,
            "kernel": self.kernel,
            "initramfs": self.initramfs,
            "cmdline": self.cmdline,
            "layers": [{"blob": x.blob, "format": x.format, "what": x.what} for x in self.layers],
            "caps": _caps_to_dict(c),
            "command": list(self.command),
            "env": [list(kv) for kv in self.env],
            "cwd": self.cwd,
            "timeout_s": self.timeout_s,
        }

    def encode(self) -> bytes:
        data: bytes = msgpack.packb(_sorted(self.to_dict()), use_bin_type=True)
        return data

    @property
    def id(self) -> str:
        return str(blake3.blake3(self.encode()).hexdigest())

    @classmethod
    def decode(cls, data: bytes, *, expected_id: str | None = None) -> ImageManifest:
        """Parse manifest bytes; refuse anything oversized, malformed, non-canonical, or not
        hashing to ``expected_id``."""
        if len(data) > MAX_MANIFEST_SIZE:
            raise ImageManifestError(f"manifest of {len(data)} bytes > {MAX_MANIFEST_SIZE}")
        if expected_id is not None and blake3.blake3(data).hexdigest() != expected_id:
            raise ImageManifestError(f"manifest bytes do not hash to image {expected_id}")
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
            if not isinstance(raw, dict):
                raise TypeError(f"a manifest is a map, not a {type(raw).__name__}")
            manifest = cls.from_dict(raw)
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,  # a nested value of the wrong kind (a list where a map belongs)
            msgpack.ExtraData,
            msgpack.FormatError,
            msgpack.StackError,
        ) as e:
            raise ImageManifestError(f"malformed image manifest: {e!r}") from e
        if manifest.encode() != data:
            raise ImageManifestError("image manifest is not in canonical form")
        return manifest

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ImageManifest:
        if raw.get("v") != VERSION:
            raise ImageManifestError(f"unknown image manifest version {raw.get('v')!r}")
        caps = raw["caps"]
        return cls(
            os=_str(raw["os"]),
            os_version=_str(raw["os_version"]),
            kernel=_str(raw["kernel"]),
            initramfs=_str(raw["initramfs"]),
            cmdline=_str(raw["cmdline"]),
            layers=tuple(
                LayerRef(blob=_str(x["blob"]), what=_str(x["what"]), format=_str(x["format"]))
                for x in raw["layers"]
            ),
            caps=_caps_from_dict(caps),
            command=tuple(_str(a) for a in raw["command"]),
            env=tuple((_str(k), _str(v)) for k, v in raw["env"]),
            cwd=_str(raw["cwd"]),
            timeout_s=_int(raw["timeout_s"]),
        )


# The caps a manifest records: those a task file sets; the first five always (see the docstring).
_RECORDED = tuple(limit for limit in LIMITS if limit.task_key is not None)
_ALWAYS = frozenset({"vcpus", "cpu_share", "memory_mib", "disk_mib", "disk_bps"})
_SHARES = tuple(limit for limit in _RECORDED if limit.unit is Unit.SHARE)


def _caps_key(limit: Limit) -> str:
    return f"{limit.name}_milli" if limit.unit is Unit.SHARE else limit.name  # no floats


def _caps_to_dict(caps: Caps) -> dict[str, Any]:
    out: dict[str, Any] = {}
    default = Caps()
    for limit in _RECORDED:
        amount = caps.amount(limit.name)
        if limit.name in _ALWAYS or amount != default.amount(limit.name):
            out[_caps_key(limit)] = round(amount * 1000) if limit.unit is Unit.SHARE else amount
    return {**out, "network": caps.network.value, "net_allow": list(caps.net_allow)}


def _caps_from_dict(raw: Mapping[str, Any]) -> Caps:
    amounts: dict[str, float] = {}
    for limit in _RECORDED:
        key = _caps_key(limit)
        if key in raw or limit.name in _ALWAYS:
            amount = _int(raw[key])
            amounts[limit.name] = amount / 1000 if limit.unit is Unit.SHARE else amount
    return Caps.of(
        amounts,
        network=NetworkMode(_str(raw["network"])),
        net_allow=tuple(_str(a) for a in raw["net_allow"]),
    )


@dataclass(frozen=True, slots=True)
class BootPaths:
    """A manifest's files on this machine: what ``worker_role.vm.Image`` takes."""

    kernel: Path
    initrd: Path
    cmdline: str
    layers: tuple[Path, ...]
    """Top first, like the manifest."""


async def materialize(manifest: ImageManifest, blobs: BlobStore, into: Path) -> BootPaths:
    """Export the manifest's blobs into ``into`` (named by blob ID; one already there is kept,
    since blob export is atomic and the name is its hash). ``into`` must be reachable by QEMU's
    user. The worker builds ``Image(kernel, initrd, cmdline, layers=...)`` from the result."""
    await trio.Path(into).mkdir(parents=True, exist_ok=True)
    await trio.Path(into).chmod(0o755)

    async def export(blob: str) -> Path:
        path = into / blob
        if not await trio.Path(path).is_file():
            await blobs.export(parse_blob_id(blob), path)
            await trio.Path(path).chmod(0o644)
        return path

    return BootPaths(
        kernel=await export(manifest.kernel),
        initrd=await export(manifest.initramfs),
        cmdline=manifest.cmdline,
        layers=tuple([await export(layer.blob) for layer in manifest.layers]),
    )


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value
