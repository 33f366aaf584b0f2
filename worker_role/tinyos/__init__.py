"""The tiny OS: Debian's kernel + busybox-static + our init, as a PVH vmlinux and an initramfs.

``python -m worker_role.tinyos build`` makes it (idempotent, cached under the data dir);
:func:`locate` finds a built one without touching the network. Same inputs, same bytes.
"""

from __future__ import annotations

from worker_role.tinyos._build import (
    GUEST_MODULES,
    TinyOs,
    build,
    data_dir,
    locate,
)

__all__ = ["GUEST_MODULES", "TinyOs", "build", "data_dir", "locate"]
