"""The p2p adapter against real libp2p hosts on loopback: streams, requests and the known traps."""

from __future__ import annotations

import functools
import socket

import pytest
import trio
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from node.dht_records import peer_id_of
from node.errors import (
    DeadlineError,
    LocalProtocolError,
    PeerUnreachableError,
    RemoteProtocolError,
    StreamBrokenError,
)
from node.identity import Identity
from node.p2p import (
    DialTimeoutError,
    P2PNode,
    UnsupportedProtocolError,
    check_protocol_id,
    connect_delay,
)
from node.p2p_stream import MessageStream
from node.wire import WireLimits
from tests.p2p_helpers import FAST, LOOPBACK, running_nodes
from tests.p2p_helpers.rogue import plaintext_host

ECHO = "/vmlend/echo/1.0.0"


async def echo(stream: MessageStream) -> None:
    async for msg in stream:
        await stream.send(msg)


async def test_the_identity_key_is_the_host_key_and_the_peer_id_survives_a_restart() -> None:
    identity = Identity.generate()
    first = P2PNode(identity, listen=[LOOPBACK])
    again = P2PNode(Identity(identity.private_key), listen=[LOOPBACK])
    assert first.peer_id == again.peer_id == peer_id_of(identity.public_bytes)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(first.run)
        assert addrs
        assert all(a.endswith(f"/p2p/{first.peer_id}") for a in addrs)
        nursery.cancel_scope.cancel()


async def test_a_node_told_not_to_join_dials_its_bootstrap_peers_only_once_told_to() -> None:
    # The daemon registers every protocol first: a peer's first contact must never see a node
    # that speaks none of them yet.
    async with running_nodes(1) as (a,), trio.open_nursery() as nursery:
        b = P2PNode(Identity.generate(), listen=[LOOPBACK], bootstrap=a.addrs[:1], **FAST)
        await nursery.start(functools.partial(b.run, join=False))
        with trio.move_on_after(1.0):  # five heartbeats: a joining node is live in one
            await a.wait_peer_count(1)
        assert a.peers() == []
        assert not b.is_connected(a.peer_id)
        b.set_handler(ECHO, echo)
        b.join()
        with trio.fail_after(5):
            await a.wait_peer_count(1)
        assert await a.request(b.peer_id, ECHO, {"type": "q"}, timeout=5) == {"type": "q"}
        nursery.cancel_scope.cancel()


async def test_connect_on_loopback_has_no_250ms_delay() -> None:
    async with running_nodes(2, bootstrap_first=False) as (a, b):
        assert connect_delay() == 0
        start = trio.current_time()
        await a.connect(b.addrs[0])
        assert trio.current_time() - start < 0.2  # py-libp2p alone: >= 0.25
        assert a.is_connected(b.peer_id)


async def test_request_and_a_multi_message_stream_with_an_explicit_end() -> None:
    async with running_nodes(2, bootstrap_first=False) as (a, b):
        b.set_handler(ECHO, echo)
        await a.connect(b.addrs[0])
        assert await a.request(b.peer_id, ECHO, {"type": "q", "n": 1}, timeout=5) == {
            "type": "q",
            "n": 1,
        }
        async with await a.open_stream(b.peer_id, ECHO) as stream:
            for n in range(5):
                await stream.send({"type": "m", "n": n, "blob": bytes(n * 1000)})
            await stream.send_end()
            got = [msg["n"] async for msg in stream]  # ends cleanly on the peer's end frame
        assert got == [0, 1, 2, 3, 4]
        with pytest.raises(trio.EndOfChannel):
            await stream.receive()


@pytest.mark.internal_errors_expected
async def test_a_raising_handler_resets_its_stream_and_the_host_keeps_serving() -> None:
    async def broken(stream: MessageStream) -> None:
        await stream.receive()
        raise RuntimeError("handler bug")

    async with running_nodes(2, bootstrap_first=False) as (a, b):
        b.set_handler(ECHO, echo)
        b.set_handler("/vmlend/broken/1.0.0", broken)
        await a.connect(b.addrs[0])
        for attempt in range(3):
            with pytest.raises(StreamBrokenError):
                await a.request(b.peer_id, "/vmlend/broken/1.0.0", {"type": "q"}, timeout=5)
            assert b.statistics()["handler_errors"] == attempt + 1
            reply = await a.request(b.peer_id, ECHO, {"type": "still-up"}, timeout=5)
            assert reply == {"type": "still-up"}


async def test_a_handler_that_returns_without_replying_is_a_protocol_error() -> None:
    async def silent(stream: MessageStream) -> None:
        await stream.receive()

    async with running_nodes(2, bootstrap_first=False) as (a, b):
        b.set_handler("/vmlend/silent/1.0.0", silent)
        await a.connect(b.addrs[0])
        with pytest.raises(RemoteProtocolError, match="without a reply"):
            await a.request(b.peer_id, "/vmlend/silent/1.0.0", {"type": "q"}, timeout=5)


async def test_a_plaintext_only_host_is_refused_both_ways() -> None:
    rogue = plaintext_host()
    async with (
        running_nodes(1) as (node,),
        rogue.run([Multiaddr(LOOPBACK)]),
    ):
        rogue_addr = str(rogue.get_addrs()[0])
        with pytest.raises(PeerUnreachableError):
            await node.connect(rogue_addr)
        with trio.fail_after(5), pytest.raises(SwarmException):
            await rogue.connect(info_from_p2p_addr(Multiaddr(node.addrs[0])))
        assert not node.is_connected(str(rogue.get_id()))
        await rogue.close()


async def test_a_silent_port_fails_the_dial_within_the_dial_timeout() -> None:
    # A listener that accepts TCP and never says a word: without a deadline the handshake waits.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        nobody = peer_id_of(Identity.generate().public_bytes)
        async with running_nodes(1, dial_timeout=0.5) as (node,):
            start = trio.current_time()
            with pytest.raises(DialTimeoutError):
                await node.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{nobody}")
            assert trio.current_time() - start < 1.5


async def test_an_unknown_protocol_is_a_typed_error() -> None:
    async with running_nodes(2, bootstrap_first=False) as (a, b):
        await a.connect(b.addrs[0])
        with pytest.raises(UnsupportedProtocolError):
            await a.open_stream(b.peer_id, "/vmlend/nope/1.0.0")


async def test_a_peer_that_never_answers_hits_the_stream_deadline() -> None:
    async def mute(stream: MessageStream) -> None:
        await trio.sleep_forever()

    async with running_nodes(2, bootstrap_first=False, stream_deadline=0.3) as (a, b):
        b.set_handler("/vmlend/mute/1.0.0", mute)
        await a.connect(b.addrs[0])
        stream = await a.open_stream(b.peer_id, "/vmlend/mute/1.0.0")
        await stream.send({"type": "q"})
        start = trio.current_time()
        with pytest.raises(DeadlineError):
            await stream.receive()
        assert 0.25 < trio.current_time() - start < 1.0
        await stream.reset()


async def test_message_size_limits_hold_on_both_sides() -> None:
    small = WireLimits(max_frame_size=1024)
    received: list[BaseException] = []
    done = trio.Event()

    async def record(stream: MessageStream) -> None:
        try:
            await stream.receive()
        except RemoteProtocolError as e:
            received.append(e)
            done.set()
            raise

    async with trio.open_nursery() as nursery:
        a = P2PNode(Identity.generate(), listen=[LOOPBACK], **FAST)
        b = P2PNode(Identity.generate(), listen=[LOOPBACK], limits=small, **FAST)
        await nursery.start(a.run)
        await nursery.start(b.run)
        b.set_handler("/vmlend/small/1.0.0", record)
        await a.connect(b.addrs[0])
        big = await a.open_stream(b.peer_id, "/vmlend/small/1.0.0")
        await big.send({"type": "big", "blob": bytes(4096)})  # a's limits allow it; b's do not
        with trio.fail_after(5):
            await done.wait()
        assert "exceeds" in str(received[0])
        with pytest.raises(StreamBrokenError):
            await big.receive()  # b reset the stream
        a.set_handler(ECHO, echo)
        to_a = await b.open_stream(a.peer_id, ECHO)
        with pytest.raises(LocalProtocolError):
            await to_a.send({"type": "big", "blob": bytes(4096)})  # refused before sending
        with pytest.raises(LocalProtocolError, match="reserved"):
            await to_a.send({"type": "vmlend.end"})
        nursery.cancel_scope.cancel()


async def test_a_protocol_holds_its_frames_to_its_own_limits() -> None:
    # Limits passed for one protocol, on both ends, replace the node's for its streams only:
    # a bigger frame travels there, a smaller limit is enforced there, other protocols keep
    # the node's.
    node_limits = WireLimits(max_frame_size=2048, max_bin=2048)
    bulk = WireLimits(max_frame_size=16384, max_bin=16384)
    tight = WireLimits(max_frame_size=512, max_bin=512)
    async with trio.open_nursery() as nursery:
        a = P2PNode(Identity.generate(), listen=[LOOPBACK], limits=node_limits, **FAST)
        b = P2PNode(Identity.generate(), listen=[LOOPBACK], limits=node_limits, **FAST)
        await nursery.start(a.run)
        await nursery.start(b.run)
        b.set_handler("/vmlend/bulk/1.0.0", echo, limits=bulk)
        b.set_handler("/vmlend/tight/1.0.0", echo, limits=tight)
        b.set_handler(ECHO, echo)
        await a.connect(b.addrs[0])
        reply = await a.request(
            b.peer_id,
            "/vmlend/bulk/1.0.0",
            {"type": "x", "blob": bytes(8192)},
            timeout=5,
            limits=bulk,
        )
        assert reply["blob"] == bytes(8192)
        with pytest.raises(LocalProtocolError):  # the node's own limits on another protocol
            await a.request(b.peer_id, ECHO, {"type": "x", "blob": bytes(8192)}, timeout=5)
        with pytest.raises(StreamBrokenError):  # over what b allows on this protocol: reset
            await a.request(
                b.peer_id, "/vmlend/tight/1.0.0", {"type": "x", "blob": bytes(1024)}, timeout=5
            )
        nursery.cancel_scope.cancel()


def test_protocol_ids_follow_the_naming_rule() -> None:
    assert check_protocol_id("/vmlend/catalog-sync/1.2.3")
    for bad in ["/ipfs/kad/1.0.0", "/vmlend/x/1.0", "/vmlend/X/1.0.0", "vmlend/x/1.0.0"]:
        with pytest.raises(LocalProtocolError):
            check_protocol_id(bad)


async def test_streams_beyond_the_per_protocol_limit_are_refused() -> None:
    async def mute(stream: MessageStream) -> None:
        await trio.sleep_forever()

    async with running_nodes(2, bootstrap_first=False, max_inbound_streams=2) as (a, b):
        b.set_handler("/vmlend/mute/1.0.0", mute)
        b.set_handler(ECHO, echo)
        await a.connect(b.addrs[0])
        held = [await a.open_stream(b.peer_id, "/vmlend/mute/1.0.0") for _ in range(2)]
        for stream in held:
            await stream.send({"type": "hold"})

        async def one_too_many() -> None:
            # The reset can land during protocol negotiation or after it: either way, broken.
            third = await a.open_stream(b.peer_id, "/vmlend/mute/1.0.0")
            await third.send({"type": "one-too-many"})
            await third.receive()

        with trio.fail_after(5), pytest.raises(StreamBrokenError):
            await one_too_many()
        assert b.statistics()["streams_refused"] == 1
        assert await a.request(b.peer_id, ECHO, {"type": "other"}, timeout=5) == {"type": "other"}
        for stream in held:
            await stream.reset()


def test_bad_addresses_are_local_errors() -> None:
    for bad in ["garbage", "/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/1/p2p/xyz"]:
        with pytest.raises(LocalProtocolError):
            P2PNode(Identity.generate(), listen=[LOOPBACK], bootstrap=[bad])
    with pytest.raises(LocalProtocolError):
        P2PNode(Identity.generate(), listen=["nonsense"])


async def test_one_peer_cannot_take_every_slot_of_a_protocol() -> None:
    async def mute(stream: MessageStream) -> None:
        await trio.sleep_forever()

    options = {"max_inbound_streams": 8, "max_inbound_streams_per_peer": 2}
    async with running_nodes(3, bootstrap_first=False, **options) as (greedy, honest, b):
        b.set_handler("/vmlend/mute/1.0.0", mute)
        await greedy.connect(b.addrs[0])
        await honest.connect(b.addrs[0])
        held = [await greedy.open_stream(b.peer_id, "/vmlend/mute/1.0.0") for _ in range(2)]
        for stream in held:
            await stream.send({"type": "hold"})

        async def open_and_wait(node: P2PNode) -> None:
            stream = await node.open_stream(b.peer_id, "/vmlend/mute/1.0.0")
            await stream.send({"type": "hold"})
            with trio.move_on_after(1):  # the muted handler never answers: only a reset ends it
                await stream.receive()

        with trio.fail_after(5), pytest.raises(StreamBrokenError):
            await open_and_wait(greedy)  # its third: over its own share
        await open_and_wait(honest)  # another peer still gets one
        assert b.statistics()["streams_refused"] == 1
        for stream in held:
            await stream.reset()
