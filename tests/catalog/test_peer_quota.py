"""The per-peer ledger of stored bytes (``catalog.peer_quota``) on a real sqlite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog.blob import BlobId
from catalog.peer_quota import PeerQuota, PeerQuotaError

A, B = BlobId(b"\xaa" * 32), BlobId(b"\xbb" * 32)


async def test_reservations_and_charges_count_against_one_peer_only(tmp_path: Path) -> None:
    async with PeerQuota.open(tmp_path / "q.db", quota=100) as quota:
        async with quota.reserve("p", 60):
            with pytest.raises(PeerQuotaError) as refused:
                async with quota.reserve("p", 41):
                    pass
            assert (refused.value.used, refused.value.asked, refused.value.quota) == (60, 41, 100)
            assert refused.value.code == "quota_exceeded"
            async with quota.reserve("other", 100):
                pass
            await quota.charge("p", A, 30, created=True)
            assert await quota.used("p") == 90
        assert await quota.used("p") == 30
        await quota.check("p", 70)
        with pytest.raises(PeerQuotaError):
            await quota.check("p", 71)


async def test_charges_survive_a_restart(tmp_path: Path) -> None:
    async with PeerQuota.open(tmp_path / "q.db", quota=100) as quota:
        await quota.charge("p", A, 30, created=True, task="t")
    async with PeerQuota.open(tmp_path / "q.db", quota=100) as quota:
        assert await quota.stored("p") == 30
        assert await quota.release_task("t") == [A]


async def test_a_blob_is_freed_only_when_no_charge_holds_it_and_a_peer_brought_it(
    tmp_path: Path,
) -> None:
    async with PeerQuota.open(tmp_path / "q.db", quota=100) as quota:
        await quota.charge("worker", A, 10, created=True, task="t")
        await quota.charge("other", A, 10, created=False)  # the same bytes, sent again
        await quota.charge("worker", B, 5, created=False)  # it was here before
        assert not await quota.release("worker", A)  # "other" still holds it
        assert await quota.release("other", A)  # ... and a peer's word brought it here
        assert not await quota.release("worker", B)  # never removed: not brought by a peer
        assert not await quota.charged(A)


async def test_a_transfer_moves_the_charge_and_keeps_who_brought_the_blob(tmp_path: Path) -> None:
    async with PeerQuota.open(tmp_path / "q.db", quota=100) as quota:
        await quota.charge("worker", A, 10, created=True, task="t")
        await quota.transfer(A, "worker", "owner", task="t")
        assert (await quota.used("worker"), await quota.used("owner")) == (0, 10)
        await quota.transfer(B, "worker", "owner", task="t")  # nothing to move: nothing moves
        assert await quota.used("owner") == 10
        assert await quota.release("owner", A)
