"""Which scheduler a node uses when nobody names one: the rule owners and workers follow, sans-IO.

Anyone can publish a scheduler record (:mod:`catalog.scheduler_record`), and peer IDs cost
nothing, so the rule must not let a stranger's key win by its value. (Sorting by peer ID did:
a key ground to sort lowest received every owner's default submission.) An owner's default
scheduler, among those it found in the DHT, is:

1. **Trusted first.** A scheduler listed in ``network.trusted_schedulers`` (bootstrap.toml,
   extended by node.toml) wins over every other; among several trusted ones, rule 3 picks.
2. **Then known.** A scheduler this node already has tasks with wins over a stranger: once an
   owner has a scheduler, later records, however many, do not take its default submissions.
3. **Then the highest score.** ``score(s) = blake3(peer ID of s, key=K)``, with ``K`` a secret
   of this node, derived from its identity key (:func:`choice_key`). Each node ranks the
   schedulers in its own, unpredictable order, stable for as long as its identity: the same
   node with the same schedulers always makes the same choice (rendezvous hashing, keyed).

What this buys and what it does not: a stranger cannot compute any node's scores, so grinding a
key is useless; each of its keys is, for each owner, one more random draw, so one key among
``n`` schedulers wins about ``1/n`` of the owners (as an honest scheduler does), never all, and
never a chosen one. An attacker who runs ``k`` of the ``n`` schedulers wins about ``k/n`` of
the owners that trust none and have no history: identities are free, so only trust (rule 1)
keeps a default submission from a Sybil flood. The owner logs once per scheduler when it
submits to one it does not trust.

A worker asks its trusted schedulers for work first (:meth:`SchedulerChoice.split`): while one
of them is being served it serves no untrusted one; with none reachable it serves every
scheduler it finds. ``worker.schedulers``, when not empty, still limits whom it serves at all.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import IntEnum

import blake3

__all__ = ["SchedulerChoice", "Tier", "choice_key"]

KEY_CONTEXT = "vmlend 2026-12 scheduler choice: the key of a node's own ranking of schedulers"
KEY_BYTES = 32


def choice_key(identity_seed: bytes) -> bytes:
    """The node's secret ranking key, derived from its identity key (so it needs no file of its
    own and lives exactly as long as the identity; the key itself is never sent anywhere)."""
    return blake3.blake3(identity_seed, derive_key_context=KEY_CONTEXT).digest()


class Tier(IntEnum):
    """Rules 1 and 2 of the module docstring; a lower tier wins."""

    TRUSTED = 0
    KNOWN = 1
    STRANGER = 2


@dataclass(frozen=True, slots=True)
class SchedulerChoice:
    """One node's rule: its secret ``key`` (:func:`choice_key`) and the peer IDs it trusts."""

    key: bytes
    trusted: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"the choice key is {KEY_BYTES} bytes")
        object.__setattr__(self, "trusted", frozenset(self.trusted))

    def is_trusted(self, scheduler: str) -> bool:
        return scheduler in self.trusted

    def score(self, scheduler: str) -> int:
        """Rule 3: this node's secret score of ``scheduler`` (higher wins)."""
        return int.from_bytes(blake3.blake3(scheduler.encode(), key=self.key).digest(), "big")

    def tier(self, scheduler: str, known: Collection[str] = ()) -> Tier:
        if scheduler in self.trusted:
            return Tier.TRUSTED
        if scheduler in known:
            return Tier.KNOWN
        return Tier.STRANGER

    def rank(self, candidates: Iterable[str], *, known: Collection[str] = ()) -> list[str]:
        """``candidates`` (duplicates dropped), the default choice first, then the next ones to
        fall back on, in order."""
        return sorted(set(candidates), key=lambda s: (self.tier(s, known), -self.score(s), s))

    def choose(self, candidates: Iterable[str], *, known: Collection[str] = ()) -> str | None:
        """The default scheduler among ``candidates``, None if there are none."""
        ranked = self.rank(candidates, known=known)
        return ranked[0] if ranked else None

    def split(self, candidates: Iterable[str]) -> tuple[list[str], list[str]]:
        """``candidates`` as (trusted, untrusted), each in this node's order: what a worker asks
        first, and what it asks only while no trusted one is served."""
        ranked = self.rank(candidates)
        return [s for s in ranked if self.is_trusted(s)], [
            s for s in ranked if not self.is_trusted(s)
        ]
