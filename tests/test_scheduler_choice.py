"""The default-scheduler rule, sans-IO (catalog.scheduler_choice): a key ground to sort first wins
no more owners than any scheduler does, a trusted scheduler always wins, and each owner's choice
is its own and stable."""

from __future__ import annotations

import functools
import random

import blake3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from catalog.scheduler_choice import SchedulerChoice, Tier, choice_key
from node.dht_records import peer_id_of

OWNERS = 300
HONEST = 4


def seed(label: str) -> bytes:
    return blake3.blake3(label.encode()).digest()


@functools.cache
def peer(n: int) -> str:
    """The peer ID of the n-th deterministic Ed25519 key."""
    key = Ed25519PrivateKey.from_private_bytes(seed(f"scheduler {n}"))
    return peer_id_of(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def owner(n: int, trusted: frozenset[str] = frozenset()) -> SchedulerChoice:
    return SchedulerChoice(choice_key(seed(f"owner {n}")), trusted)


@functools.cache
def ground_key() -> str:
    """What an attacker grinds for against the old rule (first by peer ID): the lowest ID of many
    keys, well below every honest scheduler's."""
    return min(peer(n) for n in range(1000, 3000))


SCHEDULERS = [peer(n) for n in range(HONEST)]


def test_the_ground_key_sorts_first_so_it_took_every_submission_before() -> None:
    assert sorted([*SCHEDULERS, ground_key()])[0] == ground_key()


def test_a_ground_key_wins_no_more_owners_than_an_honest_scheduler() -> None:
    candidates = [*SCHEDULERS, ground_key()]
    wins = {s: 0 for s in candidates}
    for n in range(OWNERS):
        chosen = owner(n).choose(candidates)
        assert chosen is not None
        wins[chosen] += 1
    # Each of the five wins about a fifth of the owners (60 of 300; a binomial deviation is ~7).
    assert wins[ground_key()] < OWNERS * 0.35, wins
    assert all(count > OWNERS * 0.1 for count in wins.values()), wins


def test_grinding_many_keys_wins_only_in_proportion_to_their_number() -> None:
    # Ten keys, each the lowest ID of its own batch: ten more random draws for each owner.
    ground = [min(peer(n) for n in range(3000 + 100 * b, 3100 + 100 * b)) for b in range(10)]
    captured = sum(owner(n).choose([*SCHEDULERS, *ground]) in ground for n in range(OWNERS))
    assert captured < OWNERS * 0.85  # 10 of 14 is ~71 %; sorting by ID gave them 100 %


def test_a_trusted_scheduler_wins_against_a_ground_key_for_every_owner() -> None:
    trusted = frozenset({SCHEDULERS[2]})
    for n in range(OWNERS):
        assert owner(n, trusted).choose([*SCHEDULERS, ground_key()]) == SCHEDULERS[2]


def test_a_known_scheduler_keeps_the_owner_whatever_appears_later() -> None:
    later = [peer(n) for n in range(100, 140)]
    for n in range(50):
        choice = owner(n)
        first = choice.choose(SCHEDULERS)
        assert first is not None
        assert choice.choose([*SCHEDULERS, *later], known={first}) == first
        # ... but a trusted one still wins over the known one.
        trusted = SchedulerChoice(choice.key, frozenset({later[0]}))
        assert trusted.choose([*SCHEDULERS, *later], known={first}) == later[0]


def test_owners_spread_over_the_schedulers_but_each_keeps_its_own_choice() -> None:
    choices = [owner(n).choose(SCHEDULERS) for n in range(40)]
    assert len(set(choices)) == HONEST
    assert choices == [owner(n).choose(list(reversed(SCHEDULERS))) for n in range(40)]


@given(
    owner_seed=st.binary(min_size=32, max_size=32),
    picks=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    trusted_picks=st.sets(st.integers(0, 40), max_size=5),
    known_picks=st.sets(st.integers(0, 40), max_size=5),
    data=st.randoms(use_true_random=False),
)
def test_the_rule_ranks_every_candidate_by_tier_then_score_whatever_the_order(
    owner_seed: bytes,
    picks: list[int],
    trusted_picks: set[int],
    known_picks: set[int],
    data: random.Random,
) -> None:
    candidates = [peer(i) for i in picks]
    known = {peer(i) for i in known_picks}
    choice = SchedulerChoice(choice_key(owner_seed), frozenset(peer(i) for i in trusted_picks))
    ranked = choice.rank(candidates, known=known)
    shuffled = list(candidates)
    data.shuffle(shuffled)
    assert ranked == choice.rank(shuffled, known=known)  # deterministic, order-free
    assert sorted(ranked) == sorted(set(candidates))
    tiers = [choice.tier(s, known) for s in ranked]
    assert tiers == sorted(tiers)
    chosen = choice.choose(candidates, known=known)
    assert chosen == ranked[0]
    if any(choice.is_trusted(s) for s in candidates):
        assert choice.is_trusted(chosen)  # trusted always wins when present
    elif any(s in known for s in candidates):
        assert chosen in known
    same_tier = [s for s in candidates if choice.tier(s, known) == tiers[0]]
    assert choice.score(chosen) == max(choice.score(s) for s in same_tier)
    trusted, untrusted = choice.split(candidates)
    assert set(trusted) | set(untrusted) == set(candidates)
    assert all(choice.is_trusted(s) for s in trusted)
    assert not any(choice.is_trusted(s) for s in untrusted)


def test_no_candidates_no_choice_and_the_key_is_checked() -> None:
    assert owner(0).choose([]) is None
    assert owner(0).tier(peer(1)) is Tier.STRANGER
    with pytest.raises(ValueError, match="32 bytes"):
        SchedulerChoice(b"short")
