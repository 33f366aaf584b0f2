"""The tiny OS recipe: Debian kernel package + busybox-static + ``worker_role/guest/init.sh``.

Inputs are pinned by hash: the kernel .deb is checked against the SHA256 in apt's signed index,
busybox and our init are hashed as they are. The output directory is named after the hash of all
inputs and the recipe version, so a build that already exists is reused and two builds of the same
inputs are byte-identical (reproducible cpio, no timestamps anywhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from worker_role.errors import TinyOsError
from worker_role.tinyos import _cpio
from worker_role.tinyos._elf import modinfo, vmlinux_from_bzimage

# Bump whenever the recipe changes what it produces from the same inputs.
RECIPE_VERSION = "1"
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
# What the guest needs beyond the built-in kernel: PCI virtio transport, disks, console ports,
# layer file systems, the scratch file system, and the NIC for the proxy network mode.
GUEST_MODULES = (
    # First: libcrc32c (needed by erofs and ext4) asks the crypto API for "crc32c" when it loads.
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "squashfs",
    "erofs",
    "overlay",
    "ext4",
)
# quiet + loglevel keep the serial console (slow under TCG) for what matters; panic=-1 turns a
# panic into a reboot, which the domain's on_reboot=destroy turns into "stopped without result".
KERNEL_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init mitigations=off "
    "i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1 cryptomgr.notests "
    "random.trust_cpu=on no_timer_check tsc=reliable"
)

Log = Callable[[str], None] | None


@dataclass(frozen=True, slots=True)
class TinyOs:
    """A built tiny OS: an ELF vmlinux (PVH entry) and an uncompressed newc initramfs."""

    ident: str
    kernel: Path
    initrd: Path
    cmdline: str
    kernel_release: str


def data_dir(override: Path | None = None) -> Path:
    """The node's data dir: ``$VMLEND_DATA_DIR``, else /var/lib/vmlend as root (QEMU, running as
    libvirt-qemu, cannot reach files under a root-only home), else ~/.local/share/vmlend."""
    if override is not None:
        return override
    env = os.environ.get("VMLEND_DATA_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/vmlend")
    return Path.home() / ".local/share/vmlend"


def locate(data: Path | None = None) -> TinyOs:
    """The most recently built tiny OS, without building or touching the network."""
    current = data_dir(data) / "tinyos" / "current.json"
    try:
        raw = json.loads(current.read_text())
        tiny = TinyOs(
            ident=raw["ident"],
            kernel=Path(raw["kernel"]),
            initrd=Path(raw["initrd"]),
            cmdline=raw["cmdline"],
            kernel_release=raw["kernel_release"],
        )
    except (OSError, ValueError, KeyError) as e:
        raise TinyOsError(
            f"no tiny OS built in {current.parent} ({e}); run: python -m worker_role.tinyos build"
        ) from e
    if not (tiny.kernel.is_file() and tiny.initrd.is_file()):
        raise TinyOsError(f"tiny OS {tiny.ident} is incomplete; rerun the build")
    return tiny


def build(*, data: Path | None = None, log: Log = None) -> TinyOs:
    """Build the tiny OS, or return the cached one with the same inputs."""
    root = data_dir(data) / "tinyos"
    _mkdir_public(root)
    package, version, sha256 = _resolve_kernel(log)
    init = init_script()
    busybox = _read(BUSYBOX)
    inputs = "\n".join(
        (
            RECIPE_VERSION,
            f"{package}={version}:{sha256}",
            _sha256(busybox),
            _sha256(init),
            KERNEL_CMDLINE,
            *GUEST_MODULES,
        )
    )
    ident = _sha256(inputs.encode())[:16]
    out = root / ident
    if not (out / "manifest.json").is_file():
        deb = _download(root / "downloads", package, version, sha256, log)
        _build_into(out, deb, busybox, init, ident, log)
    manifest = json.loads((out / "manifest.json").read_text())
    tiny = TinyOs(
        ident=ident,
        kernel=out / "vmlinux",
        initrd=out / "initramfs.cpio",
        cmdline=KERNEL_CMDLINE,
        kernel_release=manifest["kernel_release"],
    )
    _write_atomic(
        root / "current.json",
        json.dumps({**manifest, "kernel": str(tiny.kernel), "initrd": str(tiny.initrd)}).encode(),
    )
    return tiny


def init_script() -> bytes:
    return resources.files("worker_role.guest").joinpath("init.sh").read_bytes()


def _resolve_kernel(log: Log) -> tuple[str, str, str]:
    """(package, version, sha256) of the unsigned image behind Debian's kernel metapackage."""
    for attempt in (1, 2):
        dep = _apt_field(KERNEL_METAPACKAGE, "Depends")
        if dep is not None:
            image = dep.split(",")[0].split()[0]
            package = f"{image}-unsigned"
            version = _apt_field(package, "Version")
            sha256 = _apt_field(package, "SHA256")
            if version and sha256:
                return package, version, sha256
        if attempt == 1:
            if log:
                log("tinyos: apt index lacks the kernel package; running apt-get update")
            _run(["apt-get", "update", "-qq"])
    raise TinyOsError(f"apt knows no {KERNEL_METAPACKAGE} with an unsigned image package")


def _apt_field(package: str, field: str) -> str | None:
    """``field`` of the candidate version of ``package`` in apt's index (signed by the archive)."""
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key == field:
            return value.strip()
    return None


def _download(cache: Path, package: str, version: str, sha256: str, log: Log) -> Path:
    _mkdir_public(cache)
    deb = cache / f"{package}_{version}_amd64.deb"
    if deb.is_file() and _sha256_file(deb) == sha256:
        return deb
    if log:
        log(f"tinyos: downloading {package} {version}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # apt-get download drops privileges to _apt, which cannot write a root-owned temp dir.
        os.chmod(tmp, 0o777)
        _run(["apt-get", "download", "-qq", f"{package}={version}"], cwd=tmp)
        got = [p for p in Path(tmp).iterdir() if p.suffix == ".deb"]
        if len(got) != 1:
            raise TinyOsError(f"apt-get download gave {len(got)} .deb files")
        actual = _sha256_file(got[0])
        if actual != sha256:
            raise TinyOsError(f"{got[0].name}: sha256 {actual} != {sha256} from apt's index")
        got[0].replace(deb)
    return deb


def _build_into(out: Path, deb: Path, busybox: bytes, init: bytes, ident: str, log: Log) -> None:
    if log:
        log(f"tinyos: building {ident} from {deb.name}")
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{ident}."))
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".deb.") as tmp:
            _run(["dpkg-deb", "-x", str(deb), tmp])
            release, vmlinuz, modules = _find_kernel(Path(tmp))
            vmlinux = vmlinux_from_bzimage(vmlinuz.read_bytes())
            kos = _modules_in_load_order(modules)
        (staging / "vmlinux").write_bytes(vmlinux)
        initramfs = build_initramfs(busybox, init, kos)
        (staging / "initramfs.cpio").write_bytes(initramfs)
        manifest = {
            "ident": ident,
            "kernel_release": release,
            "cmdline": KERNEL_CMDLINE,
            "deb": deb.name,
            "vmlinux_sha256": _sha256(vmlinux),
            "initramfs_sha256": _sha256(initramfs),
            "modules": [name for name, _ in kos],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for p in staging.iterdir():
            p.chmod(0o644)
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _find_kernel(tree: Path) -> tuple[str, Path, Path]:
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise TinyOsError(f"kernel package holds {len(images)} vmlinuz images")
    release = images[0].name.removeprefix("vmlinuz-")
    modules = tree / "lib/modules" / release / "kernel"
    if not modules.is_dir():
        raise TinyOsError(f"kernel package has no modules for {release}")
    return release, images[0], modules


def _modules_in_load_order(tree: Path) -> list[tuple[str, bytes]]:
    """GUEST_MODULES and what they depend on (read from each .modinfo), dependencies first."""
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p for p in tree.rglob("*.ko")}
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise TinyOsError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = by_name.get(name)
        if path is None:
            raise TinyOsError(f"kernel package has no module {name}")
        ko = path.read_bytes()
        for deps in modinfo(ko).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep.replace("-", "_"), (*chain, name))
        done.add(name)
        order.append((name, ko))

    for name in GUEST_MODULES:
        visit(name, ())
    return order


def build_initramfs(busybox: bytes, init: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    """The initramfs as bytes: a pure function of its inputs."""
    entries = [
        _cpio.regular("init", init, executable=True),
        _cpio.directory("bin"),
        _cpio.regular("bin/busybox", busybox, executable=True),
        _cpio.symlink("bin/sh", "busybox"),
        _cpio.directory("dev"),
        _cpio.chardev("dev/console", 5, 1),
        _cpio.chardev("dev/null", 1, 3),
        _cpio.directory("lib"),
        _cpio.directory("lib/modules"),
        _cpio.regular("lib/modules/load-order", "".join(f"{n}.ko\n" for n, _ in modules).encode()),
    ]
    entries += [_cpio.regular(f"lib/modules/{name}.ko", ko) for name, ko in modules]
    entries += [_cpio.directory(d) for d in ("proc", "sys", "run", "tmp", "mnt", "newroot")]
    return _cpio.write_newc(entries)


def _mkdir_public(path: Path) -> None:
    """Create ``path`` (and parents) traversable by QEMU's user, which reads kernel and initrd."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        path.chmod(0o755)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _run(cmd: list[str], cwd: str | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TinyOsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TinyOsError(f"cannot read {path} (is busybox-static installed?): {e}") from e


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
