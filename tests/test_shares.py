"""worker_role.shares: offers go to schedulers in proportion to their shares, and a scheduler
that is away or has no work starves nobody."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_role.shares import Shares

NAMES = [f"sched-{i}" for i in range(6)]

weights_st = st.dictionaries(st.sampled_from(NAMES), st.integers(1, 10), min_size=1, max_size=6)


@given(weights=weights_st, rounds=st.integers(1, 400))
def test_with_all_schedulers_ready_each_gets_its_share(
    weights: dict[str, int], rounds: int
) -> None:
    shares = Shares(weights)
    picks = Counter(shares.pick(weights) for _ in range(rounds))
    total = sum(weights.values())
    for scheduler, weight in weights.items():
        # Stride scheduling: off by less than one pick per scheduler from the exact share.
        assert abs(picks[scheduler] - rounds * weight / total) <= len(weights)


@given(weights=weights_st)
def test_the_fractions_converge(weights: dict[str, int]) -> None:
    shares = Shares(weights)
    total = sum(weights.values())
    rounds = 100 * total
    picks = Counter(shares.pick(weights) for _ in range(rounds))
    for scheduler, weight in weights.items():
        assert picks[scheduler] / rounds == pytest.approx(weight / total, abs=len(weights) / rounds)


@given(
    weights=weights_st,
    # Each round, which of the other schedulers can be asked (reachable and not saying NoWork).
    availability=st.lists(st.sets(st.sampled_from(NAMES)), min_size=1, max_size=300),
    data=st.data(),
)
def test_a_ready_scheduler_is_never_starved(
    weights: dict[str, int], availability: list[set[str]], data: st.DataObject
) -> None:
    shares = Shares(weights)
    steady = data.draw(st.sampled_from(NAMES))
    everyone = sum(shares.weight(n) for n in NAMES)
    window = math.ceil(everyone / shares.weight(steady)) + len(NAMES)
    since = 0
    for others in availability:
        chosen = shares.pick(others | {steady})
        assert chosen in others | {steady}
        since = 0 if chosen == steady else since + 1
        assert since < window, f"{steady} not picked in {since} rounds"


@given(weights=weights_st, away=st.integers(1, 200), rounds=st.integers(1, 200))
def test_a_scheduler_coming_back_gets_no_burst(
    weights: dict[str, int], away: int, rounds: int
) -> None:
    """A scheduler that was unreachable for a while rejoins at its share, not with a backlog."""
    if len(weights) < 2:
        return
    shares = Shares(weights)
    names = sorted(weights)
    returning, others = names[0], names[1:]
    for _ in range(away):
        shares.pick(others)
    picks = Counter(shares.pick(names) for _ in range(rounds))
    total = sum(weights.values())
    assert picks[returning] <= rounds * weights[returning] / total + len(names)


def test_no_candidates_no_pick_and_unlisted_schedulers_weigh_one() -> None:
    shares = Shares({"a": 3})
    assert shares.pick([]) is None
    picks = Counter(shares.pick(["a", "b"]) for _ in range(400))
    assert picks == {"a": 300, "b": 100}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_weights_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        Shares({"a": bad})  # type: ignore[dict-item]
