"""Connections that heal (issue 15, item 1): no dial blackout after a peer's restart, keepalive
on every connection, and a dead peer's connections closed."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.custom_types import TProtocol

from node.errors import PeerUnreachableError
from node.identity import Identity
from node.p2p import P2PNode
from node.p2p_host import build_host, parse_peer_id, peer_addr, to_multiaddr
from node.p2p_keepalive import DialBackoff, KeepaliveTimes, socket_of
from node.p2p_stream import MessageStream
from tests.p2p_helpers import FAST, LOOPBACK, running_nodes
from tests.p2p_helpers.subprocess_peer import peer_process

ECHO = "/vmlend/test-echo/1.0.0"


async def _until(condition: Callable[[], bool], within: float) -> None:
    # Connection state has no change event in py-libp2p: poll it.
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def _echo(node: P2PNode, peer_id: str, n: int) -> bool:
    message = {"type": "n", "n": n}
    return await node.request(peer_id, ECHO, message, timeout=5) == message


# ---- the backoff, sans-IO ----------------------------------------------------------------------


@given(
    failures=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=20),
    noise=st.floats(0, 1, exclude_max=True),
)
def test_the_backoff_grows_stays_short_and_is_jittered_within_bounds(
    failures: list[float], noise: float
) -> None:
    backoff = DialBackoff(first=0.25, most=4.0, jitter=0.2, rng=lambda: noise)
    now = 0.0
    expected = 0.25
    for step in failures:
        now += step
        wait = backoff.failed("p", now)
        assert expected * 0.8 <= wait <= expected * 1.2
        assert backoff.wait("p", now) == pytest.approx(wait)
        assert backoff.wait("p", now + wait) == pytest.approx(0.0, abs=1e-9)
        expected = min(4.0, 2 * expected)


def test_a_peer_that_reaches_us_clears_its_backoff_at_once() -> None:
    backoff = DialBackoff(rng=lambda: 0.5)
    for _ in range(10):
        backoff.failed("p", 0.0)
    assert backoff.wait("p", 0.0) == 4.0
    backoff.reached("p")
    assert backoff.wait("p", 0.0) == 0.0
    assert backoff.failed("p", 0.0) == 0.25  # and it starts short again


def test_the_backoff_remembers_a_bounded_number_of_peers() -> None:
    backoff = DialBackoff(max_peers=100)
    for i in range(1000):
        backoff.failed(f"p{i}", float(i))
    assert len(backoff) == 100
    assert backoff.wait("p999", 999.0) > 0  # the newest are the ones kept


def test_keepalive_times_follow_the_liveness_settings() -> None:
    times = KeepaliveTimes.for_liveness(heartbeat_interval=2.0, peer_timeout=6.0)
    assert (times.idle, times.interval, times.probes, times.user_timeout) == (6, 2, 3, 12.0)
    assert KeepaliveTimes.for_liveness(heartbeat_interval=0.2, peer_timeout=1.0).user_timeout == 10


# ---- real hosts ----------------------------------------------------------------------------------


async def test_every_connection_both_ways_has_keepalive_and_a_user_timeout() -> None:
    async with running_nodes(2, bootstrap_first=False) as (a, b):
        await a.connect(b.addrs[0])
        await _until(lambda: b.is_connected(a.peer_id), 5)
        for node in (a, b):
            conns = [c for cs in node._host.get_network().connections.values() for c in cs]
            assert conns
            for conn in conns:
                sock = socket_of(conn)
                assert sock is not None
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1


async def test_a_restarted_peer_is_reached_again_at_once_not_after_a_minute(
    tmp_path: Path,
) -> None:
    """py-libp2p refused for 60 s to dial a peer whose dial had failed, even after that peer
    had connected to us again: the restarted scheduler of issue 15 was unreachable for ~51 s."""
    key = tmp_path / "peer.key"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    async with running_nodes(1) as (node,):
        async with peer_process(key=key, listen=listen) as peer:
            peer_id, addr = peer.peer_id, peer.addrs[0]
            await node.connect(addr)
            assert await node.request(peer_id, ECHO, {"type": "n", "n": 1}, timeout=5) == {
                "type": "n",
                "n": 1,
            }
            peer.kill()
            await peer.process.wait()
        await _until(lambda: not node.is_connected(peer_id), 10)
        # Its dials now fail; twice, as a heartbeat and a request would.
        for _ in range(2):
            with pytest.raises(PeerUnreachableError):
                await node.connect(addr)
        async with peer_process(node.addrs[0], key=key, listen=listen) as again:
            assert again.peer_id == peer_id
            started = trio.current_time()
            with trio.fail_after(FAST["dial_timeout"] + 2):
                # Asked before its connection to us has landed, the node still refuses at once
                # (its backoff); asked again as a heartbeat would, it answers.
                while True:
                    try:
                        assert await _echo(node, peer_id, 2)
                        break
                    except PeerUnreachableError:
                        await trio.sleep(0.05)
            assert trio.current_time() - started < FAST["dial_timeout"]


async def test_a_frozen_peers_connections_are_closed_once_it_is_declared_dead() -> None:
    """A connection to a peer that stopped answering stays open until the kernel gives up
    (minutes); streams opened on it meanwhile wait on a dead socket."""
    async with running_nodes(1) as (node,), peer_process(node.addrs[0]) as peer:
        with trio.fail_after(20):
            await node.wait_peers(lambda ps: peer.peer_id in {p.peer_id for p in ps})
        assert node.is_connected(peer.peer_id)
        peer.stop()
        window = FAST["peer_timeout"] + 3 * FAST["heartbeat_interval"] + FAST["dial_timeout"]
        await _until(lambda: not node.is_connected(peer.peer_id), window + 2)
        peer.cont()
        with trio.fail_after(10):
            await node.wait_peers(lambda ps: peer.peer_id in {p.peer_id for p in ps})
        assert await node.request(peer.peer_id, ECHO, {"type": "n", "n": 3}, timeout=5) == {
            "type": "n",
            "n": 3,
        }


async def test_a_peer_without_our_heartbeat_keeps_a_busy_connection_and_loses_an_idle_one() -> None:
    """A peer that never answers heartbeats (a plain libp2p peer) is not closed after one failed
    ping, nor while it has a stream open with us; once it counts as dead and its connection is
    idle, the connection is closed: it held a connection slot for nothing."""
    hold = "/vmlend/test-hold/1.0.0"
    release = trio.Event()

    async def held(stream: MessageStream) -> None:
        await release.wait()

    async with running_nodes(1) as (node,):
        node.set_handler(hold, held)
        listen = to_multiaddr(LOOPBACK)
        plain = build_host(Identity.generate(), [listen])
        async with plain.run([listen]):
            await plain.connect(peer_addr(node.addrs[0]))
            plain_id = str(plain.get_id())
            await _until(lambda: node.is_connected(plain_id), 5)
            stream = await plain.new_stream(parse_peer_id(node.peer_id), [TProtocol(hold)])
            # Long enough for several failed pings and for the peer to count as dead.
            await trio.sleep(FAST["peer_timeout"] + 5 * FAST["heartbeat_interval"])
            assert node.is_connected(plain_id)
            assert node.statistics()["pings_failed"] >= 1
            release.set()
            await stream.close()
            window = FAST["peer_timeout"] + 3 * FAST["heartbeat_interval"] + FAST["dial_timeout"]
            await _until(lambda: not node.is_connected(plain_id), window + 5)


async def test_the_connection_ceilings_are_the_nodes_own() -> None:
    """[network] max_connections / max_connections_per_peer reach py-libp2p's swarm."""
    async with running_nodes(1, max_connections=7, max_connections_per_peer=2) as (node,):
        config = node._host.get_network().connection_config
        assert (config.max_connections, config.max_connections_per_peer) == (7, 2)
        assert config.high_watermark <= 7
