"""Which scheduler the worker asks for work next: stride scheduling over the lender's shares.

Sans-IO. The agent calls :meth:`Shares.pick` with the schedulers it could ask right now (connected,
served by its policy, not answering ``NoWork`` lately) each time it has room; over many picks with
the same candidates, each one's fraction of the picks converges to ``weight / sum(weights)``.

Each scheduler has a *pass*; the candidate with the lowest pass is picked (ties by peer ID, so it
is deterministic) and its pass grows by ``1 / weight``. A scheduler that was away (unreachable, no
work) rejoins at the current pass rather than at its old, lower one, so it gets its share from
then on but no burst of catch-up picks that would starve the others; a scheduler that has no work
is simply not a candidate, so it starves nobody either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fractions import Fraction

__all__ = ["DEFAULT_WEIGHT", "Shares"]

DEFAULT_WEIGHT = 1
"""The weight of a scheduler the lender did not list in ``worker.shares``."""


class Shares:
    def __init__(self, weights: Mapping[str, int] | None = None) -> None:
        self._weights = dict(weights or {})
        for scheduler, weight in self._weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ValueError(
                    f"share of {scheduler}: expected a positive integer, got {weight!r}"
                )
        self._pass: dict[str, Fraction] = {}
        self._now = Fraction(0)

    def weight(self, scheduler: str) -> int:
        return self._weights.get(scheduler, DEFAULT_WEIGHT)

    def pick(self, candidates: Iterable[str]) -> str | None:
        """The scheduler to ask now, among ``candidates`` (None if there are none)."""
        ready = sorted(set(candidates))
        if not ready:
            return None
        for scheduler in ready:
            self._pass[scheduler] = max(self._pass.get(scheduler, self._now), self._now)
        chosen = min(ready, key=lambda s: (self._pass[s], s))
        self._now = self._pass[chosen]
        self._pass[chosen] += Fraction(1, self.weight(chosen))
        return chosen

    def forget(self, scheduler: str) -> None:
        """Drop what is remembered of ``scheduler`` (it rejoins at the current pass anyway)."""
        self._pass.pop(scheduler, None)
