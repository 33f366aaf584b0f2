"""Output from a guest cannot drive the terminal it is shown on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.terminal import TerminalSafe


def test_escape_sequences_become_visible_text() -> None:
    safe = TerminalSafe()
    shown = safe.filter(b"ok\x1b]0;owned\x07\x1b[2J\x9b31mred\r\n\tdone\x7f")
    # A lone 0x9b byte is not UTF-8: shown as U+FFFD, which no terminal acts on.
    assert shown == "ok^[]0;owned^G^[[2J\ufffd31mred\r\n\tdone^?".encode()


def test_utf8_split_across_chunks_is_kept_and_c1_as_a_character_is_caught() -> None:
    safe = TerminalSafe()
    data = "héllo \u009b2J €".encode()
    shown = b"".join(safe.filter(data[i : i + 1]) for i in range(len(data)))
    assert shown == "héllo \\x9b2J €".encode()


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_nothing_shown_holds_an_escape_or_another_control(chunks: list[bytes]) -> None:
    safe = TerminalSafe()
    shown = b"".join(safe.filter(c) for c in chunks) + safe.filter(b"", final=True)
    text = shown.decode()
    assert not any(
        (ord(ch) < 0x20 and ch not in "\t\n\r") or 0x7F <= ord(ch) <= 0x9F for ch in text
    )
