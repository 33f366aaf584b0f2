"""Does a task fit a worker's offer? The worker's own comparison (:class:`Allowance`), applied to
the room it offered, so a lease is never refused on arrival.

Sans-IO; used by the queue (against ``offer.room``) and by :mod:`explain` (against
``offer.capacity``, to tell "busy now" from "never").
"""

from __future__ import annotations

from catalog.caps import Allowance, Caps, Violation
from catalog.dispatch import Offer


def violations(room: Caps, need: Caps) -> list[Violation]:
    """Every limit of ``room`` that ``need`` exceeds (empty: it fits)."""
    return Allowance.room(room).violations(need)


def offer_fits(offer: Offer, need: Caps) -> bool:
    return not violations(offer.room, need)
