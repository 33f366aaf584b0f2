"""Where a VM's files live, and whether QEMU's user can reach them.

Under ``qemu:///system`` QEMU runs as ``libvirt-qemu``: every kernel, layer, disk and socket path
must be traversable by that user (a directory under root's home is not, and QEMU then fails with a
bare "Permission denied" long after we could have said why).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from worker_role.errors import VmSetupError
from worker_role.tinyos import data_dir

DEFAULT_QEMU_USER = "libvirt-qemu"


@dataclass(frozen=True, slots=True)
class QemuUser:
    uid: int
    gids: frozenset[int]

    @classmethod
    def lookup(cls, name: str | None) -> QemuUser:
        """``name``'s ids; None means QEMU runs as this process (``qemu:///session``)."""
        if name is None:
            return cls(os.geteuid(), frozenset(os.getgroups()) | {os.getegid()})
        try:
            pw = pwd.getpwnam(name)
        except KeyError as e:
            raise VmSetupError(f"QEMU's user {name!r} does not exist") from e
        gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(pw.pw_uid, frozenset(gids))

    def can(self, path: Path, bits: int) -> bool:
        """Whether this user has ``bits`` (an ``S_IR``/``S_IW``/``S_IX`` "other" mask) on path."""
        if self.uid == 0:
            return True
        st = path.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & (bits << 6))
        if st.st_gid in self.gids:
            return bool(st.st_mode & (bits << 3))
        return bool(st.st_mode & bits)


def default_runtime_dir() -> Path:
    return data_dir() / "vm"


def check_reachable(user: QemuUser, path: Path, *, what: str) -> None:
    """Raise :class:`VmSetupError` naming the first component QEMU's user cannot pass or read."""
    path = path.absolute()
    try:
        for parent in reversed(path.parents):
            if not user.can(parent, stat.S_IXOTH):
                raise VmSetupError(
                    f"{what} {path}: QEMU's user (uid {user.uid}) cannot enter {parent}; "
                    "choose a directory outside root-only trees (e.g. /var/lib/vmlend)"
                )
        if path.is_dir():
            if not user.can(path, stat.S_IXOTH):
                raise VmSetupError(f"{what} {path}: not enterable by QEMU's user (uid {user.uid})")
        elif not user.can(path, stat.S_IROTH):
            raise VmSetupError(f"{what} {path}: not readable by QEMU's user (uid {user.uid})")
    except OSError as e:
        raise VmSetupError(f"{what} {path}: {e}") from e


def make_vm_dir(runtime: Path, name: str, user: QemuUser, owner: dict[str, object]) -> Path:
    """The VM's private directory, owned by QEMU's user so QEMU can bind its sockets there."""
    d = runtime / name
    d.mkdir(mode=0o750)
    (d / "owner.json").write_text(json.dumps(owner))
    if os.geteuid() == 0:
        os.chown(d, user.uid, -1)
    return d


def read_dir_owner(d: Path) -> dict[str, object] | None:
    try:
        raw = json.loads((d / "owner.json").read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None
