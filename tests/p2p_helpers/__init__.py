"""Helpers for tests that run real libp2p hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from node.identity import Identity
from node.p2p import P2PNode

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
FAST = {
    "heartbeat_interval": 0.2,
    "peer_timeout": 1.0,
    "stream_deadline": 2.0,
    "dial_timeout": 2.0,
    "discovery_interval": 0.5,
}


@asynccontextmanager
async def running_nodes(
    n: int, *, bootstrap_first: bool = True, **options: Any
) -> AsyncIterator[list[P2PNode]]:
    """Start ``n`` nodes on loopback; every node after the first bootstraps from the first."""
    opts = {**FAST, **options}
    async with trio.open_nursery() as nursery:
        nodes: list[P2PNode] = []
        first = P2PNode(Identity.generate(), listen=[LOOPBACK], **opts)
        addrs = await nursery.start(first.run)
        nodes.append(first)
        for _ in range(n - 1):
            node = P2PNode(
                Identity.generate(),
                listen=[LOOPBACK],
                bootstrap=[addrs[0]] if bootstrap_first else [],
                **opts,
            )
            await nursery.start(node.run)
            nodes.append(node)
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()
