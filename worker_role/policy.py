"""The lending policy: what a lender allows all the VMs it runs for others to use, together.

Pure logic, no I/O. The additive limits (vCPUs, CPU share, memory, disk, disk and network rates)
bound the *sum* over every VM running plus the one asked for, because that is what a lender gives
away: a per-VM limit would let ``max_concurrent_vms`` VMs take that many times more. With a single
VM the two readings agree. A request is refused whole, before any VM starts, naming every limit it
exceeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from node.errors import VmlendError
from worker_role.caps import Caps, NetworkMode
from worker_role.egress_errors import InvalidAllowRule
from worker_role.egress_rules import AllowList, AllowRule

# cpu_share is a float; sums of floats drift by an ulp, which must not turn "exactly the limit" into
# a refusal, nor let remaining() offer a share that check() then rejects.
_SHARE_EPSILON = 1e-9
# The smallest VM Caps accepts; less memory than this left means nothing more can be lent.
_MIN_MEMORY_MIB = 32


class PolicyError(VmlendError):
    """Root of the lending policy's errors."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One limit a request exceeds: ``asked`` against ``allowed`` with ``in_use`` already lent.

    ``asked``/``in_use``/``allowed`` are ``None`` for yes/no limits (network, scheduler).
    """

    limit: str
    message: str
    asked: float | None = None
    in_use: float | None = None
    allowed: float | None = None


class PolicyViolation(PolicyError):
    """A request asks for more than the lender allows; ``violations`` lists every limit exceeded."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        if not violations:
            raise ValueError("PolicyViolation needs at least one violation")
        super().__init__("; ".join(v.message for v in violations))
        self.violations = tuple(violations)


@dataclass(frozen=True, slots=True, kw_only=True)
class LendingPolicy:
    """What a lender allows, in the units of :class:`Caps`.

    ``max_cpu_share`` is host CPUs' worth (the unit of ``Caps.cpu_share``) all lent VMs together may
    use: 1.0 on a 2-core host lends half the machine.
    ``max_disk_bps``/``max_net_bps`` (bytes/s) and ``max_disk_iops`` (operations/s) of ``None`` mean
    no limit; when set, a request must carry its own finite rate (0, "unlimited", is refused).
    ``schedulers`` holds the peer IDs of the schedulers served; empty means any. ``net_allow`` is
    the lender's egress allow-list (entries as in :mod:`worker_role.egress_rules`): every
    destination a task asks for in ``Caps.net_allow`` must fall within one of them; ``None`` lets a
    task name any destination (the proxy still never lets a guest reach internal addresses it was
    not given by address).
    """

    max_vcpus: int = 1
    max_cpu_share: float = 1.0
    max_memory_mib: int = 1024
    max_disk_mib: int = 4096
    max_concurrent_vms: int = 1
    network_allowed: bool = False
    max_disk_bps: int | None = None
    max_disk_iops: int | None = None
    max_net_bps: int | None = None
    schedulers: frozenset[str] = field(default_factory=frozenset)
    net_allow: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("max_vcpus", "max_memory_mib", "max_disk_mib", "max_concurrent_vms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_cpu_share >= 0:  # also rejects NaN
            raise ValueError(f"max_cpu_share must be >= 0, got {self.max_cpu_share}")
        for name in ("max_disk_bps", "max_disk_iops", "max_net_bps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        # A list or set from config would make the frozen policy unhashable or mutable.
        object.__setattr__(self, "schedulers", frozenset(self.schedulers))
        if self.net_allow is not None:
            object.__setattr__(self, "net_allow", tuple(self.net_allow))
            AllowList(self.net_allow)  # raises InvalidAllowRule (a ValueError) on a bad entry

    def serves(self, scheduler: str) -> bool:
        """Whether work from the scheduler with this peer ID is accepted."""
        return not self.schedulers or scheduler in self.schedulers

    def violations(
        self, request: Caps, running: Sequence[Caps], *, scheduler: str | None = None
    ) -> list[Violation]:
        """Every limit ``request`` would exceed next to the VMs in ``running`` (empty: it fits)."""
        found: list[Violation] = []
        if len(running) + 1 > self.max_concurrent_vms:
            found.append(
                Violation(
                    "concurrent_vms",
                    f"{len(running) + 1} VMs at once exceeds the lender's limit of "
                    f"{self.max_concurrent_vms}",
                    asked=len(running) + 1,
                    in_use=len(running),
                    allowed=self.max_concurrent_vms,
                )
            )
        used = _Totals.of(running)
        checks: list[tuple[str, str, float, float, float | None, str]] = [
            ("vcpus", "vCPUs", request.vcpus, used.vcpus, self.max_vcpus, ""),
            (
                "cpu_share",
                "CPU share",
                request.cpu_share,
                used.cpu_share,
                self.max_cpu_share,
                " host CPUs",
            ),
            (
                "memory_mib",
                "memory",
                request.memory_mib,
                used.memory_mib,
                self.max_memory_mib,
                " MiB",
            ),
            ("disk_mib", "disk", request.disk_mib, used.disk_mib, self.max_disk_mib, " MiB"),
            ("disk_bps", "disk rate", request.disk_bps, used.disk_bps, self.max_disk_bps, " B/s"),
            (
                "disk_iops",
                "disk operations",
                request.disk_iops,
                used.disk_iops,
                self.max_disk_iops,
                " IOPS",
            ),
        ]
        if request.network is NetworkMode.PROXY:
            checks.append(
                ("net_bps", "network rate", request.net_bps, used.net_bps, self.max_net_bps, " B/s")
            )
        for limit, label, asked, in_use, allowed, unit in checks:
            if allowed is None:
                continue
            if limit in ("disk_bps", "disk_iops", "net_bps") and asked == 0:
                found.append(
                    Violation(
                        limit,
                        f"{label} unlimited exceeds the lender's limit of {_num(allowed)}{unit}",
                        asked=asked,
                        in_use=in_use,
                        allowed=allowed,
                    )
                )
            elif in_use + asked > allowed + (_SHARE_EPSILON if limit == "cpu_share" else 0):
                found.append(
                    Violation(
                        limit,
                        _exceeds(label, asked, in_use, allowed, unit),
                        asked=asked,
                        in_use=in_use,
                        allowed=allowed,
                    )
                )
        if request.network is NetworkMode.PROXY and not self.network_allowed:
            found.append(Violation("network", "network access is not allowed by the lender"))
        elif request.network is NetworkMode.PROXY and self.net_allow is not None:
            outside = _outside(request.net_allow, AllowList(self.net_allow))
            if outside:
                found.append(
                    Violation(
                        "net_allow",
                        f"network destinations {', '.join(outside)} are outside the lender's "
                        f"allow-list ({', '.join(self.net_allow) or 'empty'})",
                    )
                )
        if scheduler is not None and not self.serves(scheduler):
            found.append(
                Violation("scheduler", f"scheduler {scheduler} is not one this lender serves")
            )
        return found

    def check(
        self, request: Caps, running: Sequence[Caps], *, scheduler: str | None = None
    ) -> None:
        """Raise :class:`PolicyViolation` naming every limit ``request`` exceeds, else return."""
        found = self.violations(request, running, scheduler=scheduler)
        if found:
            raise PolicyViolation(found)

    def fits(self, request: Caps, running: Sequence[Caps], *, scheduler: str | None = None) -> bool:
        """Whether :meth:`check` would accept ``request``."""
        return not self.violations(request, running, scheduler=scheduler)

    def remaining(self, running: Sequence[Caps]) -> Caps | None:
        """The largest single VM still lendable next to ``running``, or ``None`` if none is.

        Rates left when a limit is set are finite; with no limit they are 0 (unlimited), as in Caps.
        The network is offered only when allowed and, with a rate limit, only if some rate is left.
        """
        if len(running) >= self.max_concurrent_vms:
            return None
        used = _Totals.of(running)
        vcpus = self.max_vcpus - used.vcpus
        cpu_share = min(self.max_cpu_share - used.cpu_share, float(vcpus))
        memory_mib = self.max_memory_mib - used.memory_mib
        disk_mib = self.max_disk_mib - used.disk_mib
        disk_bps = 0 if self.max_disk_bps is None else self.max_disk_bps - used.disk_bps
        disk_iops = 0 if self.max_disk_iops is None else self.max_disk_iops - used.disk_iops
        if (
            vcpus < 1
            or cpu_share <= _SHARE_EPSILON
            or memory_mib < _MIN_MEMORY_MIB
            or disk_mib < 1
            or (self.max_disk_bps is not None and disk_bps <= 0)
            or (self.max_disk_iops is not None and disk_iops <= 0)
        ):
            return None
        net_bps = 0 if self.max_net_bps is None else self.max_net_bps - used.net_bps
        network = self.network_allowed and (self.max_net_bps is None or net_bps > 0)
        return Caps(
            vcpus=vcpus,
            cpu_share=cpu_share,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
            disk_bps=disk_bps,
            disk_iops=disk_iops,
            network=NetworkMode.PROXY if network else NetworkMode.NONE,
            net_bps=net_bps if network else 0,
            net_allow=(("*",) if self.net_allow is None else self.net_allow) if network else (),
        )


@dataclass(frozen=True, slots=True)
class _Totals:
    vcpus: int
    cpu_share: float
    memory_mib: int
    disk_mib: int
    disk_bps: int
    disk_iops: int
    net_bps: int

    @classmethod
    def of(cls, running: Iterable[Caps]) -> _Totals:
        vms = list(running)
        return cls(
            vcpus=sum(c.vcpus for c in vms),
            cpu_share=sum(c.cpu_share for c in vms),
            memory_mib=sum(c.memory_mib for c in vms),
            disk_mib=sum(c.disk_mib for c in vms),
            disk_bps=sum(c.disk_bps for c in vms),
            disk_iops=sum(c.disk_iops for c in vms),
            # A VM without network uses none of the network budget, whatever net_bps says.
            net_bps=sum(c.net_bps for c in vms if c.network is NetworkMode.PROXY),
        )


def _outside(entries: Sequence[str], lender: AllowList) -> list[str]:
    """The entries a task asks for that are malformed or not within the lender's allow-list."""
    outside = []
    for entry in entries:
        try:
            rule = AllowRule.parse(entry)
        except InvalidAllowRule:
            outside.append(repr(entry))
            continue
        if not lender.covers(rule):
            outside.append(str(rule))
    return outside


def _exceeds(label: str, asked: float, in_use: float, allowed: float, unit: str) -> str:
    if in_use == 0:
        return f"{label} {_num(asked)}{unit} exceeds the lender's limit of {_num(allowed)}{unit}"
    left = max(allowed - in_use, 0)
    return (
        f"{label} {_num(asked)}{unit} exceeds what is left of the lender's limit of "
        f"{_num(allowed)}{unit} ({_num(in_use)}{unit} in use, {_num(left)}{unit} left)"
    )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
