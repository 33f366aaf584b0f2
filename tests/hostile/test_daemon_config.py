"""A whole daemon, as `vmlend node start` composes it, takes what node.toml says and its RPCs
hold up when the network does not."""

from __future__ import annotations

from pathlib import Path

import trio

from node.errors import DeadlineError
from tests.hostile.test_scheduler_records import start_daemon


async def test_the_node_takes_its_peer_quota_from_node_toml(tmp_path: Path) -> None:
    home = tmp_path / "node"
    await trio.Path(home).mkdir(mode=0o700)
    await trio.Path(home / "node.toml").write_text('[catalog]\npeer_quota = "3MiB"\n')
    async with trio.open_nursery() as nursery:
        node = await start_daemon(nursery, home, [], ["owner"], exist_ok=True)
        assert node.blobs is not None
        assert node.blobs.peer_quota.quota == 3 << 20
        nursery.cancel_scope.cancel()


async def test_the_scheduler_takes_keep_finished_from_node_toml(tmp_path: Path) -> None:
    home = tmp_path / "node"
    await trio.Path(home).mkdir(mode=0o700)
    await trio.Path(home / "node.toml").write_text('[scheduler]\nkeep_finished = "2h"\n')
    async with trio.open_nursery() as nursery:
        node = await start_daemon(nursery, home, [], ["scheduler"], exist_ok=True)
        assert node.scheduler is not None
        assert node.scheduler.retention.keep_finished == 2 * 3600
        nursery.cancel_scope.cancel()


async def test_schedulers_wait_asks_again_after_a_lookup_overran(tmp_path: Path) -> None:
    """Found in the network lab: one listing that overran (nothing known yet) failed the whole
    schedulers.wait with an internal error instead of asking again until its own timeout."""
    home = tmp_path / "node"
    async with trio.open_nursery() as nursery:
        node = await start_daemon(nursery, home, [], ["owner"])
        calls = 0

        async def flaky(params: list[object]) -> list[dict[str, object]]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise DeadlineError("DHT index lookup of 'scheduler' took over 10s")
            return [{"peer_id": "the-scheduler"}]

        node._rpc_schedulers_list = flaky  # type: ignore[method-assign]
        found = await node._rpc_schedulers_wait([{"count": 1, "timeout": 10}])
        assert found == [{"peer_id": "the-scheduler"}]
        assert calls == 2
        nursery.cancel_scope.cancel()
