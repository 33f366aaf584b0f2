"""Faults only a real separate process shows: a peer killed (SIGKILL) or frozen (SIGSTOP)."""

from __future__ import annotations

import pytest
import trio

from node.errors import DeadlineError, StreamBrokenError
from tests.p2p_helpers import FAST, running_nodes
from tests.p2p_helpers.subprocess_peer import peer_process


async def test_a_peer_killed_mid_message_is_a_broken_stream_not_an_end() -> None:
    async with running_nodes(1) as (node,), peer_process() as peer:
        await node.connect(peer.addrs[0])
        stream = await node.open_stream(peer.peer_id, "/vmlend/test-half/1.0.0")
        await stream.send({"type": "go"})
        assert await stream.receive() == {"type": "whole", "n": 1}
        await peer.wait_event("half-sent")
        peer.kill()
        with trio.fail_after(FAST["stream_deadline"]), pytest.raises(StreamBrokenError):
            await stream.receive()


async def test_a_peer_killed_between_messages_is_a_broken_stream_not_an_end() -> None:
    # The trap: py-libp2p reports the dead connection as a clean EOF at a frame boundary.
    async with running_nodes(1) as (node,), peer_process() as peer:
        await node.connect(peer.addrs[0])
        stream = await node.open_stream(peer.peer_id, "/vmlend/test-one/1.0.0")
        await stream.send({"type": "go"})
        await peer.wait_event("one-sent")
        assert await stream.receive() == {"type": "whole", "n": 1}
        peer.kill()
        with trio.fail_after(FAST["stream_deadline"]), pytest.raises(StreamBrokenError):
            await stream.receive()


async def test_a_frozen_peer_ends_in_a_deadline_error_within_the_stream_deadline() -> None:
    async with running_nodes(1, stream_deadline=0.5) as (node,), peer_process() as peer:
        await node.connect(peer.addrs[0])
        stream = await node.open_stream(peer.peer_id, "/vmlend/test-echo/1.0.0")
        await stream.send({"type": "ping", "n": 1})
        assert await stream.receive() == {"type": "ping", "n": 1}
        peer.stop()
        await stream.send({"type": "ping", "n": 2})
        start = trio.current_time()
        with trio.fail_after(5), pytest.raises(DeadlineError):
            await stream.receive()
        # At least the deadline (it was the deadline, not something else, that ended the wait);
        # the upper bound is fail_after's, generous because the clock is real on a busy box.
        assert trio.current_time() - start > 0.4
        with pytest.raises(DeadlineError):  # the stream stays broken
            await stream.receive()
        peer.cont()


async def test_a_killed_node_leaves_every_peer_list_within_the_heartbeat_window() -> None:
    async with running_nodes(3) as nodes:
        async with peer_process(nodes[0].addrs[0]) as peer:
            with trio.fail_after(20):
                for node in nodes:
                    await node.wait_peers(lambda ps: peer.peer_id in {p.peer_id for p in ps})
            peer.kill()
            window = FAST["peer_timeout"] + 2 * FAST["heartbeat_interval"]
            with trio.fail_after(window + 1.0):
                for node in nodes:
                    await node.wait_peers(lambda ps: peer.peer_id not in {p.peer_id for p in ps})
        # The survivors still see each other.
        for node in nodes:
            assert len(node.peers()) == 2


async def test_a_frozen_node_leaves_peer_lists_and_returns_when_thawed() -> None:
    async with running_nodes(1) as (node,), peer_process(node.addrs[0]) as peer:
        with trio.fail_after(20):
            await node.wait_peers(lambda ps: peer.peer_id in {p.peer_id for p in ps})
        peer.stop()
        with trio.fail_after(FAST["peer_timeout"] + 2 * FAST["heartbeat_interval"] + 1.0):
            await node.wait_peers(lambda ps: peer.peer_id not in {p.peer_id for p in ps})
        peer.cont()
        with trio.fail_after(10):
            await node.wait_peers(lambda ps: peer.peer_id in {p.peer_id for p in ps})
