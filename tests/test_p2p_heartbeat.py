"""The live-peer set, sans-IO: a peer stays live for peer_timeout after its last heartbeat; the
heartbeat's two messages are typed."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import RemoteProtocolError
from node.heartbeat import PINGS, PONGS, Liveness, Ping, Pong
from node.wire_message import MessageSet


def test_a_peer_is_live_until_peer_timeout_after_its_last_heartbeat() -> None:
    live = Liveness(peer_timeout=3.0)
    assert live.seen("a", 10.0)  # joined: changed
    assert not live.seen("a", 11.0)  # still live: no change
    assert not live.sweep(14.0)  # 3.0 after the last heartbeat: still live
    assert live.live == {"a"}
    assert live.sweep(14.01)  # silent for longer than peer_timeout: gone
    assert live.live == frozenset()
    assert live.last_seen("a") is None


def test_forget_and_bad_timeout() -> None:
    live = Liveness(peer_timeout=1.0)
    live.seen("a", 0.0)
    assert live.forget("a", 0.5)
    with pytest.raises(ValueError, match="positive"):
        Liveness(peer_timeout=0)


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 100)), max_size=30),
    st.floats(0, 200),
)
def test_the_live_set_is_exactly_the_recently_seen(
    beats: list[tuple[str, float]], now: float
) -> None:
    live = Liveness(peer_timeout=5.0)
    beats.sort(key=lambda b: b[1])
    for peer, t in beats:
        live.seen(peer, t)
    now = max([now, *(t for _, t in beats)])
    live.sweep(now)
    last = {}
    for peer, t in beats:
        last[peer] = t
    assert live.live == {p for p, t in last.items() if now - t <= 5.0}


def test_a_ping_and_a_pong_are_bare_typed_maps_each_one_way() -> None:
    assert PINGS.encode(Ping()) == {"type": "ping"}
    assert PONGS.encode(Pong()) == {"type": "pong"}
    assert PINGS.decode({"type": "ping"}) == Ping()
    assert PONGS.decode({"type": "pong"}) == Pong()


@pytest.mark.parametrize(
    ("expected", "raw"),
    [
        (PINGS, {"type": "pong"}),
        (PINGS, {"type": "ping", "n": 1}),
        (PINGS, {}),
        (PINGS, {"type": b"ping"}),
        (PONGS, {"type": "ping"}),
        (PONGS, {"type": "pong", "n": 1}),
    ],
)
def test_anything_but_the_bare_message_expected_is_refused(
    expected: MessageSet[Any], raw: dict[str, object]
) -> None:
    with pytest.raises(RemoteProtocolError):
        expected.decode(raw)
