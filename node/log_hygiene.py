"""Log lines a peer cannot flood: cut to a size, and the same warning said once a minute.

Peers choose much of what ends up in a log line (a rejected record, a protocol name, an error
text from a library). :class:`LogHygiene` is a handler filter: a message longer than
``max_chars`` is cut and its full size and hash given instead of the rest, and a warning or
error logged again with the same template by the same logger within ``interval`` seconds is
held back, the next one that passes saying how many were.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

MAX_CHARS = 400
INTERVAL = 60.0
MAX_TEMPLATES = 1024


class LogHygiene(logging.Filter):
    def __init__(
        self,
        *,
        max_chars: int = MAX_CHARS,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._max_chars = max_chars
        self._interval = interval
        self._clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (when said, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and not self._say_again(record):
            return False
        message = record.getMessage()
        if len(message) > self._max_chars:
            digest = hashlib.sha256(message.encode(errors="replace")).hexdigest()[:16]
            record.msg = f"{message[: self._max_chars]}… ({len(message)} chars, sha256 {digest})"
            record.args = None
        return True

    def _say_again(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = self._clock()
        said, held = self._last.get(key, (-self._interval, 0))
        if now - said < self._interval:
            self._last[key] = (said, held + 1)
            return False
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self._interval:g}s)"
        if len(self._last) >= MAX_TEMPLATES and key not in self._last:
            self._last.clear()  # bounded: forgetting only lets a warning through once more
        self._last[key] = (now, 0)
        return True


LIBP2P = "libp2p"
_libp2p_level = logging.WARNING  # py-libp2p's own choice, until configure_logging says otherwise


def set_libp2p_level(level: int) -> None:
    """The level py-libp2p's loggers log at (the CLI: silent below ``-vv``), kept across its
    import (:func:`route_libp2p_logs_through_ours`)."""
    global _libp2p_level
    _libp2p_level = level
    logging.getLogger(LIBP2P).setLevel(level)


def route_libp2p_logs_through_ours() -> None:
    """py-libp2p, on its first import, detaches its loggers (propagation off, no handler, its
    own level), so Python's last-resort handler wrote its warnings raw on stderr, once a second
    for a bootstrap peer that is down. Called once it is imported: its records reach our handler
    again, formatted and kept to a size and rate, at the level we chose."""
    logger = logging.getLogger(LIBP2P)
    logger.handlers.clear()
    logger.setLevel(_libp2p_level)
    logger.propagate = True
