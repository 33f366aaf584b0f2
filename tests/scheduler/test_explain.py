"""Why a task waits: never (too big for all), not now (busy), the image, the quorum rule."""

from __future__ import annotations

import trio

from catalog.dispatch import LeaseGrant
from scheduler_role.explain import explain
from scheduler_role.queue import Queue, SeenOffer
from tests.scheduler.conftest import offer, spec


async def why(queue: Queue, task_id: str) -> list[str]:
    return explain(await queue.status(task_id), queue.offers, queue.held_by())


async def test_no_worker_offers_enough_memory(queue: Queue) -> None:
    await queue.submit(spec("big", memory_mib=8192))
    await queue.lease("w1", offer(memory_mib=4096))
    await queue.lease("w2", offer(memory_mib=2048))
    assert await why(queue, "big") == [
        "1 replica waiting for a worker",
        "no worker offers 8 GiB memory (largest: 4 GiB)",
    ]


async def test_no_worker_allows_network(queue: Queue) -> None:
    await queue.submit(spec("net", network=True))
    await queue.lease("w1", offer())
    assert "no worker allows network access" in await why(queue, "net")


async def test_workers_busy(queue: Queue) -> None:
    await queue.submit(spec("a"))
    await queue.submit(spec("b"))
    await queue.submit(spec("c"))
    for w in ("w1", "w2"):
        assert isinstance(await queue.lease(w, offer()), LeaseGrant)
        # Now full: the next offer has no room but the same capacity.
        full = offer(memory_mib=64)
        queue.offers[w] = SeenOffer(offer().__class__(room=full.room, capacity=offer().capacity),
                                    trio.current_time())  # fmt: skip
    assert await why(queue, "c") == ["1 replica waiting for a worker", "2 workers busy"]


async def test_waiting_for_image_and_for_any_worker(queue: Queue) -> None:
    await queue.submit(spec("a", image_id=None))
    await queue.begin_assembly("a")
    assert await why(queue, "a") == ["waiting for image assembly"]
    await queue.submit(spec("b"))
    assert "no worker has asked for work recently" in await why(queue, "b")


async def test_quorum_needs_different_workers(queue: Queue) -> None:
    await queue.submit(spec("a", replicas=2, quorum=2))
    assert isinstance(await queue.lease("w1", offer()), LeaseGrant)
    lines = await why(queue, "a")
    assert (
        "1 worker already ran a replica of this task (each replica needs a different worker)"
        in (lines)
    )


async def test_a_sidelined_worker_is_named_not_counted_as_free(queue: Queue) -> None:
    await queue.submit(spec("a"))
    await queue.submit(spec("b"))
    grant = await queue.lease("w1", offer())
    assert isinstance(grant, LeaseGrant)
    await queue.lost("w1", [grant.lease])  # before its VM started: w1 is sidelined
    lines = explain(await queue.status("b"), queue.offers, queue.held_by(), await queue.sidelined())
    assert lines[0] == "2 replicas waiting for a worker" or lines[0].endswith(
        "waiting for a worker"
    )
    assert any(x.startswith("1 worker sidelined for 5 s more at most") for x in lines), lines
    assert not any("can take it" in x for x in lines), lines
