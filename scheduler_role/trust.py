"""Who may hold a replica, and whose result may count alone: the scheduler's Sybil policy, sans-IO.

Peer IDs are free, so a key proves nothing about how many machines stand behind it. Two things
cost an attacker more than a key, and this module is built on them (BOINC's rules are the model):

* **Networks.** A worker's network is the address its connection comes from *as this scheduler
  observes it* (never what the worker says), cut to a prefix (/24 for IPv4, /48 for IPv6 by
  default). Replicas of one task never go to two workers on one network, nor twice to one peer,
  so a machine with a thousand keys still holds one replica of a task, and agreement counts
  networks, not keys.
* **Earned trust.** Each scheduler keeps a record of every worker it has judged
  (:class:`WorkerRecord`: agreed, disagreed, lost, expired, and the current streak of agreements).
  A worker is trusted once its streak reaches ``trust_after`` (BOINC: 10 consecutive valid
  results); a disagreement, a lost lease or an expired lease resets the streak. A result from an
  untrusted worker never decides a task alone: it needs an agreeing result from a worker on
  another network (adaptive replication: the queue adds a replica when it is missing). An
  untrusted worker holds at most ``untrusted_max_leases`` leases at once, and a network whose
  untrusted worker let a lease of a task lapse is not given that task again, so identities on one
  network cannot take turns at a replica until its attempts are used up.

A worker whose leases fail before their VM starts (it cannot fetch, boot, or reach libvirt) is
sick, not dishonest: it is **sidelined**, given no lease for :func:`sideline_for` seconds (5, 10,
20, ... up to ``SIDELINE_MAX``) after each such failure in a row, and forgiven at its next VM that
starts. While it rests, the task's retry goes to another worker.

``LAB`` turns both off, for a laboratory where every worker shares one address (loopback tests,
``make demo``): every peer is its own network and every worker is trusted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from catalog.dispatch import MAX_REPLICAS
from scheduler_role.task import TaskSpec

if TYPE_CHECKING:
    from node.config import SchedulerConfig

UNKNOWN_NETWORK = "unknown"
"""The network of a worker whose address the transport does not tell: all such share one."""


class Conduct(StrEnum):
    """What a worker did, as the scheduler judged it."""

    AGREED = "agreed"  # its result was part of the agreement that decided a task
    DISAGREED = "disagreed"  # it reported something other than what the quorum agreed
    LOST = "lost"  # it said it lost a lease (it crashed)
    EXPIRED = "expired"  # its lease lapsed without a heartbeat


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One worker's record at this scheduler."""

    agreed: int = 0
    disagreed: int = 0
    lost: int = 0
    expired: int = 0
    streak: int = 0  # consecutive agreements since its last disagreement, loss or expiry

    def after(self, conduct: Conduct) -> WorkerRecord:
        if conduct is Conduct.AGREED:
            return replace(self, agreed=self.agreed + 1, streak=self.streak + 1)
        if conduct is Conduct.DISAGREED:
            return replace(self, disagreed=self.disagreed + 1, streak=0)
        if conduct is Conduct.LOST:
            return replace(self, lost=self.lost + 1, streak=0)
        return replace(self, expired=self.expired + 1, streak=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The scheduler's placement and trust rules (``[scheduler]`` in ``node.toml``)."""

    min_quorum: int = 1
    distinct_networks: bool = True
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    trust_after: int = 10
    untrusted_max_leases: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_quorum <= MAX_REPLICAS:
            raise ValueError(f"min_quorum must be in [1, {MAX_REPLICAS}]")
        if not 0 <= self.ipv4_prefix <= 32 or not 0 <= self.ipv6_prefix <= 128:
            raise ValueError("network prefixes must be 0-32 (IPv4) and 0-128 (IPv6)")
        if self.trust_after < 0 or self.untrusted_max_leases < 1:
            raise ValueError("trust_after must be >= 0 and untrusted_max_leases >= 1")

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> Policy:
        """The policy ``[scheduler]`` in ``node.toml`` sets."""
        return cls(
            min_quorum=config.min_quorum,
            distinct_networks=config.distinct_networks,
            ipv4_prefix=config.ipv4_prefix,
            ipv6_prefix=config.ipv6_prefix,
            trust_after=config.trust_after,
        )

    def network_of(self, peer_id: str, address: tuple[str, int] | None) -> str:
        """The network ``peer_id`` counts as, from the address its connection was seen from."""
        if not self.distinct_networks:
            return f"peer:{peer_id}"
        if address is None:
            return UNKNOWN_NETWORK
        try:
            ip = ipaddress.ip_address(address[0].split("%", 1)[0])
        except ValueError:
            return UNKNOWN_NETWORK
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        prefix = self.ipv4_prefix if ip.version == 4 else self.ipv6_prefix
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def trusted(self, record: WorkerRecord) -> bool:
        return record.streak >= self.trust_after

    def max_leases(self, record: WorkerRecord, max_leases_per_worker: int) -> int:
        """How many leases a worker with ``record`` may hold at once."""
        if self.trusted(record):
            return max_leases_per_worker
        return min(self.untrusted_max_leases, max_leases_per_worker)

    def apply(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` with at least ``min_quorum`` replicas that must agree."""
        if spec.quorum >= self.min_quorum:
            return spec
        return replace(spec, replicas=max(spec.replicas, self.min_quorum), quorum=self.min_quorum)


LAB = Policy(distinct_networks=False, trust_after=0)
"""Every peer its own network, every worker trusted: only where all workers share one address."""


SIDELINE_BASE = 5.0
SIDELINE_MAX = 160.0


def sideline_for(failures: int) -> float:
    """Seconds a worker gets no lease after ``failures`` (>= 1) leases in a row failed to start."""
    if failures < 1:
        return 0.0
    return min(SIDELINE_MAX, SIDELINE_BASE * 2.0 ** min(failures - 1, 32))


def replica_cap(spec: TaskSpec) -> int:
    """How many replicas a task may grow to when results need confirming from other networks."""
    return min(MAX_REPLICAS, 2 * spec.replicas + 2)
