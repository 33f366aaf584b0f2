"""The lab's links with delay and loss: a userspace forwarder between pairs of TAP devices.

This kernel has no netem, so a shaped link is two TAP devices (one in each namespace it joins)
and this program moves every Ethernet frame from one to the other after ``delay_ms``, dropping
each with probability ``loss`` (a seeded generator per direction). Frames keep their order. A
direction holds at most :data:`QUEUE_FRAMES` frames in flight; more are dropped, as a router's
full queue would.

    ip netns exec <switch> python -m tests.netlab.forwarder LINKS_JSON

``LINKS_JSON`` is a list of {"a": [netns, dev], "b": [netns, dev], "delay_ms", "loss", "seed"}.
The process prints ``ready`` once it holds every TAP and runs until killed.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import trio

from tests.netlab.netns import open_tap

QUEUE_FRAMES = 4096
MAX_FRAME = 65_536


@dataclass
class Direction:
    src: int
    dst: int
    delay: float  # seconds
    loss: float
    rng: random.Random
    forwarded: int = 0
    dropped: int = 0


async def pump(d: Direction) -> None:
    send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE_FRAMES)

    async def deliver() -> None:
        async for due, frame in receive:
            await trio.sleep_until(due)
            try:
                os.write(d.dst, frame)
            except OSError:
                d.dropped += 1  # the far device is down: the frame is lost, as on a wire
            else:
                d.forwarded += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        while True:
            await trio.lowlevel.wait_readable(d.src)
            while True:
                try:
                    frame = os.read(d.src, MAX_FRAME)
                except BlockingIOError:
                    break
                if d.loss and d.rng.random() < d.loss:
                    d.dropped += 1
                    continue
                try:
                    send.send_nowait((trio.current_time() + d.delay, frame))
                except trio.WouldBlock:
                    d.dropped += 1


def directions(links: list[dict[str, Any]]) -> list[Direction]:
    out = []
    for link in links:
        a = open_tap(*link["a"])
        b = open_tap(*link["b"])
        delay = float(link["delay_ms"]) / 1000
        loss = float(link["loss"])
        seed = int(link.get("seed", 0))
        out.append(Direction(a, b, delay, loss, random.Random(seed * 2)))
        out.append(Direction(b, a, delay, loss, random.Random(seed * 2 + 1)))
    return out


async def main(links: list[dict[str, Any]]) -> None:
    pumps = directions(links)
    print("ready", flush=True)
    async with trio.open_nursery() as nursery:
        for d in pumps:
            nursery.start_soon(pump, d)


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
