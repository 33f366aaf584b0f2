"""Where a node keeps its files: the data directory every command and the daemon agree on.

Apart from :mod:`node.config` (which re-exports it) because a command that only talks to the
running node needs the directory, not the parsing of its configuration files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def resolve_data_dir(flag: str | None, *, env: Mapping[str, str] | None = None) -> Path:
    """``--data`` > ``$VMLEND_DATA`` > ``$XDG_DATA_HOME/vmlend`` > ``~/.local/share/vmlend``.

    Empty variables count as unset, and a relative ``$XDG_DATA_HOME`` is ignored, as the XDG base
    directory spec says. The result is absolute, so a later ``chdir`` cannot move it.
    """
    env = os.environ if env is None else env
    for candidate in (flag, env.get("VMLEND_DATA")):
        if candidate:
            return Path(candidate).expanduser().absolute()
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "vmlend"
    return Path("~/.local/share/vmlend").expanduser().absolute()
