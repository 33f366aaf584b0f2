"""Issue 15: schedulers cut apart for longer than the peer timeout agree again soon after the
cut heals, and the healthy side can still list the schedulers while it lasts. One round here;
``bench/chaos.py`` runs several and reports the times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chaos.catalog_partition import as_dicts, run_catalog_partition

pytestmark = pytest.mark.e2e

HOLD = 10.0  # beyond the 6 s peer timeout: each side has declared the other dead
LIST_TIMEOUT = 10.0  # schedulers.list's own bound


async def test_a_healed_scheduler_partition_converges_and_listing_never_fails(
    lab_prefix: str, tmp_path: Path
) -> None:
    (only,) = await run_catalog_partition(lab_prefix, tmp_path, rounds=1, hold=HOLD)
    shown = json.dumps(as_dicts([only]), indent=1)
    assert only.held_s >= HOLD, shown
    # Both healthy schedulers, each with the other's record; the cut one at most stale.
    assert only.listed_during_cut >= 2, shown
    assert only.listing_during_cut_s <= LIST_TIMEOUT + 2, shown
    # The goal is 5 s (the bench measures it); a loaded CI machine gets twice that.
    assert only.converged_after_s <= 10.0, shown
    assert set(only.each_after_s) == {"s0", "s1", "s2"}, shown
