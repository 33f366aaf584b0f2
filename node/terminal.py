"""A stranger's output made safe to show on a terminal.

A task's stdout and stderr come from a guest that anyone may have written. Shown raw, its escape
sequences could rewrite the screen, retitle the window, hide text or, on some terminals, answer
back into the input. :class:`TerminalSafe` shows every control character except newline, tab and
carriage return as visible text (``ESC`` as ``^[``, C1 controls as ``\\x9b``), decoding UTF-8
across chunk boundaries and showing undecodable bytes as U+FFFD. Files and pipes get the raw bytes;
only what goes to a terminal passes through it, unless the user asks for raw output.
"""

from __future__ import annotations

import codecs
import re
import sys

# C0 controls but \t \n \r, DEL, and the C1 controls (U+0080-U+009F, e.g. CSI as one character).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x9f]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)
    return "^?" if code == 0x7F else f"\\x{code:02x}"


class TerminalSafe:
    """One output stream's filter (it keeps a partial UTF-8 character between chunks)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def filter(self, data: bytes, *, final: bool = False) -> bytes:
        text = self._decoder.decode(data, final=final)
        return _CONTROL.sub(_visible, text).encode()


RAW_HELP = "pass the task's output through as it is (on a terminal, controls are shown as text)"


class OutputWriter:
    """Write a task's stdout and stderr to ours: raw to files and pipes, made safe for a
    terminal (see :class:`TerminalSafe`) unless ``raw``."""

    def __init__(self, *, raw: bool = False) -> None:
        self._streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        self._filters = {
            name: None if raw or not out.isatty() else TerminalSafe()
            for name, out in (("stdout", sys.stdout), ("stderr", sys.stderr))
        }

    def write(self, stream: str, data: bytes) -> None:
        safe = self._filters.get(stream)
        out = self._streams["stdout" if stream == "stdout" else "stderr"]
        out.write(safe.filter(data) if safe is not None else data)
        out.flush()
