"""Does a task fit a worker's offer? The same rules the worker will apply, so a lease is never
refused on arrival: an offer is read as a one-VM :class:`LendingPolicy` and asked the question.

Sans-IO; used by the queue (against ``offer.room``) and by :mod:`explain` (against
``offer.capacity``, to tell "busy now" from "never").
"""

from __future__ import annotations

from scheduler_role.messages import Offer
from worker_role.caps import Caps, NetworkMode
from worker_role.policy import LendingPolicy, Violation


def as_policy(room: Caps) -> LendingPolicy:
    """The policy that allows exactly one VM of at most ``room`` (rates: 0 means no limit)."""
    network = room.network is NetworkMode.PROXY
    return LendingPolicy(
        max_vcpus=room.vcpus,
        max_cpu_share=room.cpu_share,
        max_memory_mib=room.memory_mib,
        max_disk_mib=room.disk_mib,
        max_concurrent_vms=1,
        network_allowed=network,
        max_disk_bps=room.disk_bps or None,
        max_net_bps=(room.net_bps or None) if network else None,
        net_allow=None if "*" in room.net_allow else room.net_allow,
    )


def violations(room: Caps, need: Caps) -> list[Violation]:
    """Every limit of ``room`` that ``need`` exceeds (empty: it fits)."""
    return as_policy(room).violations(need, [])


def offer_fits(offer: Offer, need: Caps) -> bool:
    return not violations(offer.room, need)
