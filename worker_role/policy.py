"""The lending policy: what a lender allows all the VMs it runs for others to use, together.

Pure logic, no I/O. The additive limits (:data:`node.limits.LIMITS` marks them) bound the *sum*
over every VM running plus the one asked for, because that is what a lender gives away: a per-VM
limit would let ``max_concurrent_vms`` VMs take that many times more. With a single VM the two
readings agree. A request is refused whole, before any VM starts, naming every limit it
exceeds. The comparison itself is :class:`catalog.caps.Allowance`, the one the scheduler's
matching uses too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from catalog.caps import Allowance, Caps, Violation
from node.allow_rules import AllowList
from node.config import WorkerConfig
from node.errors import VmlendError
from node.limits import LIMITS, Amounts, limit_named


class PolicyError(VmlendError):
    """Root of the lending policy's errors."""


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

    ``ceilings`` bound all lent VMs together, by limit name (:data:`node.limits.LIMITS`); a limit
    not named has none, and the default is what ``node.toml``'s defaults state. ``cpu_share`` is
    host CPUs' worth: 1.0 on a 2-core host lends half the machine. ``schedulers`` holds the peer
    IDs of the schedulers served; empty means any. ``net_allow`` is the lender's egress
    allow-list (entries as in :mod:`node.allow_rules`): every destination a task asks for in
    ``Caps.net_allow`` must fall within one of them, and the egress proxy lets a guest reach only
    what both lists allow. Empty allows nothing, whatever ``network_allowed`` says; ``*`` allows
    any public destination, and an internal one (loopback, the LAN, 169.254.169.254, this host's
    own addresses) only where the list names that address or name exactly.
    """

    ceilings: Mapping[str, float] = field(default_factory=lambda: _DEFAULT_CEILINGS)
    max_concurrent_vms: int = 1
    network_allowed: bool = False
    schedulers: frozenset[str] = field(default_factory=frozenset)
    net_allow: tuple[str, ...] = ()
    vm_overhead_mib: int = 0
    """What each VM costs the host in memory beyond its guest's: QEMU itself and, under TCG, its
    translation cache. It counts against the memory ceiling, so a lender's ``max_memory`` bounds
    what lending really takes from the machine."""

    def __post_init__(self) -> None:
        if self.vm_overhead_mib < 0:
            raise ValueError(f"vm_overhead_mib must be >= 0, got {self.vm_overhead_mib}")
        if self.max_concurrent_vms < 0:
            raise ValueError(f"max_concurrent_vms must be >= 0, got {self.max_concurrent_vms}")
        # A list or set from config would make the frozen policy unhashable or mutable.
        object.__setattr__(self, "schedulers", frozenset(self.schedulers))
        # The allowance refuses a ceiling below 0 or on a name that is no limit.
        object.__setattr__(self, "ceilings", Allowance(ceilings=self.ceilings).ceilings)
        object.__setattr__(self, "net_allow", tuple(self.net_allow))
        AllowList(self.net_allow)  # raises InvalidAllowRule (a ValueError) on a bad entry

    @classmethod
    def of(cls, config: WorkerConfig) -> LendingPolicy:
        """The policy ``node.toml``'s ``[worker]`` section states."""
        return cls(
            ceilings=_ceilings({limit.name: config.limits[limit.config_key] for limit in LIMITS}),
            max_concurrent_vms=config.max_concurrent_vms,
            network_allowed=config.network_allowed,
            schedulers=frozenset(config.schedulers),
            net_allow=config.net_allow,
            vm_overhead_mib=VM_OVERHEAD_MIB,
        )

    @property
    def allowance(self) -> Allowance:
        """The ceilings on the sum of every lent VM's caps."""
        return Allowance(
            ceilings=self.ceilings, network=self.network_allowed, net_allow=self.net_allow
        )

    def _allowance_for(self, vms: int) -> Allowance:
        """:attr:`allowance` with the memory ceiling less what ``vms`` VMs cost themselves."""
        memory = self.ceilings.get("memory_mib")
        if memory is None or not self.vm_overhead_mib:
            return self.allowance
        left = max(0.0, memory - vms * self.vm_overhead_mib)
        return replace(self.allowance, ceilings={**self.ceilings, "memory_mib": left})

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
        for v in self._allowance_for(len(running) + 1).violations(request, running):
            if v.limit == "memory_mib" and self.vm_overhead_mib:
                v = replace(
                    v,
                    message=f"{v.message}: of the lender's {self.ceilings['memory_mib']:.0f} MiB, "
                    f"{self.vm_overhead_mib} MiB per VM go to running the VM itself",
                )
            found.append(v)
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
        """The largest single VM still lendable next to ``running``, or ``None`` if none is."""
        if len(running) >= self.max_concurrent_vms:
            return None
        return self._allowance_for(len(running) + 1).remaining(running)


def _ceilings(written: Mapping[str, float]) -> Amounts:
    """The ceilings a lender's written limits (by limit name) state, in the units of Caps."""
    ceilings = {name: limit_named(name).ceiling(amount) for name, amount in written.items()}
    return Amounts({name: c for name, c in ceilings.items() if c is not None})


# Measured here (bench/vm, TCG, 128 MiB tiny-OS guest, translation cache 32 MiB): an idle VM
# holds 53 MiB of private memory beyond its guest RAM; a busy one a little more.
VM_OVERHEAD_MIB = 64

_DEFAULT_CEILINGS: Amounts = _ceilings({limit.name: limit.config_default for limit in LIMITS})
