"""The one way to build a filesystem path from a name that came from outside (a peer, a guest).

``contained(root, *names)`` joins names that are each a single, plain path component (the ID
grammar of :mod:`node.wire_fields`: letters, digits and ``._:-``, not starting with a symbol, so
never ``..``, never a separator, never empty) and checks the result is still below ``root``. No
other code joins a stranger's string onto a path.
"""

from __future__ import annotations

from pathlib import Path

from node.errors import VmlendError
from node.wire_fields import ID_RE


class UncontainedPathError(VmlendError, ValueError):
    """A name from outside would not make a path inside the directory meant for it."""


def contained(root: Path, *names: str) -> Path:
    path = root
    for name in names:
        if type(name) is not str or not ID_RE.fullmatch(name):
            raise UncontainedPathError(f"{str(name)[:80]!r} is not a plain file name")
        path = path / name
    # The grammar already rules out escapes; this guards the grammar itself.
    if not path.is_relative_to(root) or (path == root and names):
        raise UncontainedPathError(f"{path} is not inside {root}")
    return path
