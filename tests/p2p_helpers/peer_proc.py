"""One P2PNode in its own process, for tests that SIGKILL or SIGSTOP a peer.

Usage: python -m tests.p2p_helpers.peer_proc [--publish KIND] [BOOTSTRAP_ADDR]. Prints one JSON line
{"peer_id": ..., "addrs": [...]} once listening, and a line "EVENT <name>" at each point a test
waits for. Protocols served:

- /vmlend/test-echo/1.0.0: echoes every message until the client's end;
- /vmlend/test-half/1.0.0: sends one whole message, then half of a frame, then waits
  (prints "EVENT half-sent");
- /vmlend/test-one/1.0.0: sends one whole message, then waits without an end frame
  (prints "EVENT one-sent").

With ``--publish KIND`` it publishes its own record of KIND once it has a live peer ("EVENT
published"). ``VMLEND_TEST_TIMINGS`` (JSON) overrides the fast test timings; ``VMLEND_TEST_KEY``
(a key file, created if missing) and ``VMLEND_TEST_LISTEN`` (a multiaddr) let a test restart "the
same" peer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from node.errors import IdentityError
from node.identity import Identity
from node.p2p import P2PNode
from node.p2p_stream import MessageStream
from node.wire import encode_frame

TIMINGS = {
    "heartbeat_interval": 0.2,
    "peer_timeout": 1.0,
    "stream_deadline": 2.0,
    "dial_timeout": 2.0,
    "discovery_interval": 0.5,
    **json.loads(os.environ.get("VMLEND_TEST_TIMINGS", "{}")),
}


def event(name: str) -> None:
    print(f"EVENT {name}", flush=True)


async def echo(stream: MessageStream) -> None:
    async for msg in stream:
        await stream.send(msg)


async def half(stream: MessageStream) -> None:
    await stream.send({"type": "whole", "n": 1})
    frame = encode_frame({"type": "cut", "data": b"x" * 1000})
    await stream._raw.write(frame[: len(frame) // 2])
    event("half-sent")
    await trio.sleep_forever()


async def one(stream: MessageStream) -> None:
    await stream.send({"type": "whole", "n": 1})
    event("one-sent")
    await trio.sleep_forever()


async def main(args: list[str]) -> None:
    publish = None
    if args[:1] == ["--publish"]:
        publish, args = args[1], args[2:]
    bootstrap = args
    key = os.environ.get("VMLEND_TEST_KEY")
    identity = Identity.generate()
    if key:
        try:
            identity = Identity.load(Path(key))
        except IdentityError:
            identity.save(Path(key))
    listen = os.environ.get("VMLEND_TEST_LISTEN", "/ip4/127.0.0.1/tcp/0")
    node = P2PNode(identity, listen=[listen], bootstrap=bootstrap, **TIMINGS)
    node.set_handler("/vmlend/test-echo/1.0.0", echo)
    node.set_handler("/vmlend/test-half/1.0.0", half)
    node.set_handler("/vmlend/test-one/1.0.0", one)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(node.run)
        print(json.dumps({"peer_id": node.peer_id, "addrs": addrs}), flush=True)
        if publish is not None:
            await node.wait_peer_count(1)
            await node.put_record(publish, node.peer_id, {"name": node.peer_id[-6:]}, ttl=600)
            event("published")


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
