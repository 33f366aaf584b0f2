"""Resource caps: what one VM may use, and the one comparison of a request with what is allowed.

This is part of the contract between the roles. An owner asks for :class:`Caps`; the scheduler
matches them against a worker's offer, the worker's lending policy checks them again, and the VM
backend applies them. Matching and policy both ask :meth:`Allowance.violations`, so a lease is
never refused on arrival for a reason the scheduler could have seen. Pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from node.allow_rules import MAX_RULES, AllowList, AllowRule, InvalidAllowRule, is_internal
from node.errors import LocalProtocolError
from node.limits import LIMITS, Amounts, Limit, Unit, limit_named
from node.units import human_size
from node.wire_fields import as_int, as_map, as_seconds, as_text, as_tuple, check_keys

MIB = 1024 * 1024
MAX_NET_ALLOW = MAX_RULES
# A share (cpu_share) is a float; sums of floats drift by an ulp, which must not turn "exactly the
# limit" into a refusal, nor let remaining() offer a share that violations() then refuses.
_SHARE_EPSILON = 1e-9


class NetworkMode(StrEnum):
    """How a guest reaches the outside: not at all, or only through the worker's egress proxy."""

    NONE = "none"
    PROXY = "proxy"


@dataclass(frozen=True, slots=True, kw_only=True)
class Caps:
    """Limits for one VM; each limit is a row of :data:`node.limits.LIMITS`, checked from there.

    ``cpu_share`` is the fraction of one host CPU the whole VM may use (0 < share <= vcpus),
    enforced on the whole QEMU process, not just the vCPU threads. ``disk_bps``/``disk_iops`` of 0
    mean unlimited. ``net_bps`` caps the egress proxy for this VM (0 = unlimited).
    """

    vcpus: int = 1
    cpu_share: float = 1.0
    memory_mib: int = 256
    disk_mib: int = 256
    disk_bps: int = 0
    disk_iops: int = 0
    network: NetworkMode = NetworkMode.NONE
    net_bps: int = 0
    net_allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for limit in LIMITS:
            value = getattr(self, limit.name)
            bound = None if limit.at_most is None else getattr(self, limit.at_most)
            if not _admits(limit, value, bound):
                raise ValueError(f"{limit.name} must be {_range(limit, bound)}, got {value}")
        object.__setattr__(self, "network", NetworkMode(self.network))
        object.__setattr__(self, "net_allow", tuple(self.net_allow))

    @classmethod
    def of(
        cls,
        amounts: Mapping[str, float],
        *,
        network: NetworkMode = NetworkMode.NONE,
        net_allow: Sequence[str] = (),
    ) -> Caps:
        """Caps from amounts by limit name; a limit not named keeps its default."""
        typed: dict[str, Any] = {name: limit_named(name).typed(v) for name, v in amounts.items()}
        return cls(**typed, network=network, net_allow=tuple(net_allow))

    def amount(self, name: str) -> float:
        """The amount of the limit ``name``, for code that reads every limit alike."""
        limit_named(name)  # KeyError for a field that is no limit (network, net_allow)
        value: float = getattr(self, name)
        return value

    def to_wire(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in _CAPS_KEYS}
        out["network"] = self.network.value
        out["net_allow"] = list(self.net_allow)
        return out

    @classmethod
    def from_wire(cls, raw: object) -> Caps:
        """Caps as a peer sent them; anything else raises :class:`LocalProtocolError`."""
        value = as_map("caps", raw)
        check_keys("caps", value, _CAPS_KEYS, frozenset())
        amounts = {limit.name: _wire_amount(limit, value[limit.name]) for limit in LIMITS}
        try:
            return cls.of(
                amounts,
                network=NetworkMode(as_text("network", value["network"])),
                net_allow=as_tuple("net_allow", value["net_allow"], MAX_NET_ALLOW, _allow_entry),
            )
        except ValueError as e:  # Caps' own checks, and an unknown network mode
            raise LocalProtocolError(f"caps: {e}") from None


_CAPS_KEYS = {f.name for f in fields(Caps)}
_LIMIT_NAMES = frozenset(limit.name for limit in LIMITS)


def _admits(limit: Limit, value: float, bound: float | None) -> bool:
    low_ok = value > 0 if limit.unit is Unit.SHARE else value >= limit.least
    return low_ok and (bound is None or value <= bound)


def _range(limit: Limit, bound: float | None) -> str:
    if bound is None:
        return "> 0" if limit.unit is Unit.SHARE else f">= {limit.least}"
    low = "(0" if limit.unit is Unit.SHARE else f"[{limit.least}"
    return f"in {low}, {limit.at_most}={bound}]"


def _wire_amount(limit: Limit, raw: object) -> float:
    if limit.unit is Unit.SHARE:
        return as_seconds(limit.name, raw)  # positive and finite
    return as_int(limit.name, raw, limit.least, limit.most)


def _allow_entry(value: object) -> str:
    return as_text("a net_allow entry", value)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Allowance:
    """Ceilings on the caps of every VM running plus the one asked for, by limit name: on their
    sum for an additive limit (:data:`node.limits.LIMITS`), on each VM's otherwise.

    A limit without a ceiling is not limited. Where 0 means unlimited (rates), a request under a
    ceiling must carry its own finite amount (0, "unlimited", is refused). ``net_allow`` is
    the lender's egress allow-list: each destination a request names must fall within one of its
    rules (:meth:`node.allow_rules.AllowRule.covers`; ``*`` covers no internal address), so an
    empty one admits no destination at all. The egress proxy applies both lists again.
    """

    ceilings: Mapping[str, float]
    network: bool = False
    net_allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, ceiling in self.ceilings.items():
            if name not in _LIMIT_NAMES:
                raise ValueError(f"no limit is named {name!r}")
            if not ceiling >= 0:  # also refuses NaN
                raise ValueError(f"the ceiling on {name} must be >= 0, got {ceiling}")
        object.__setattr__(self, "ceilings", Amounts(self.ceilings))
        object.__setattr__(self, "net_allow", tuple(self.net_allow))

    @classmethod
    def room(cls, room: Caps) -> Allowance:
        """Exactly what one VM of at most ``room`` may use (a rate of 0 in ``room``: no limit);
        ``room.net_allow`` is the lender's allow-list as offered."""
        network = room.network is NetworkMode.PROXY
        ceilings = {}
        for limit in LIMITS:
            amount = room.amount(limit.name)
            unlimited = limit.unit.zero_is_unlimited and amount == 0
            if not unlimited and (network or not limit.per_network):
                ceilings[limit.name] = amount
        return cls(
            ceilings=ceilings,
            network=network,
            net_allow=room.net_allow,
        )

    def violations(self, request: Caps, running: Sequence[Caps] = ()) -> list[Violation]:
        """Every ceiling ``request`` would exceed next to ``running`` (empty: it fits)."""
        found: list[Violation] = []
        used = _used(running)
        for limit in LIMITS:
            allowed = self.ceilings.get(limit.name)
            if allowed is None or (limit.per_network and request.network is NetworkMode.NONE):
                continue
            asked, in_use = request.amount(limit.name), used[limit.name]
            label, unit = limit.label, limit.unit
            if limit.unit.zero_is_unlimited and asked == 0:
                message = f"{label} unlimited exceeds the lender's limit of {_shown(allowed, unit)}"
            elif in_use + asked > allowed + (_SHARE_EPSILON if limit.unit is Unit.SHARE else 0):
                message = _exceeds(label, asked, in_use, allowed, unit)
            else:
                continue
            found.append(
                Violation(limit.name, message, asked=asked, in_use=in_use, allowed=allowed)
            )
        if request.network is NetworkMode.PROXY and not self.network:
            found.append(Violation("network", "network access is not allowed by the lender"))
        elif request.network is NetworkMode.PROXY:
            outside = _outside(request.net_allow, AllowList(self.net_allow))
            if outside:
                found.append(
                    Violation(
                        "net_allow",
                        f"network destinations {', '.join(outside)} are outside the lender's "
                        f"allow-list ({', '.join(self.net_allow) or 'empty'})",
                    )
                )
        return found

    def remaining(self, running: Sequence[Caps] = ()) -> Caps | None:
        """The largest single VM still allowed next to ``running``, or ``None`` if none is.

        A limit without a ceiling is offered at the most a VM may state, or at 0 (unlimited)
        where 0 means that; under a ceiling, a rate left is finite. The network is offered only
        when allowed and, under a ceiling on its rate, only if some rate is left.
        """
        used = _used(running)
        left: dict[str, float] = {}
        network = self.network
        for limit in LIMITS:
            ceiling = self.ceilings.get(limit.name)
            if ceiling is None:
                amount: float = 0 if limit.unit.zero_is_unlimited else limit.most
            else:
                amount = ceiling - used[limit.name] if limit.additive else ceiling
            if limit.at_most is not None:
                amount = min(amount, left[limit.at_most])
            if ceiling is None or _room_for_one(limit, amount):
                left[limit.name] = amount
            elif limit.per_network:
                network, left[limit.name] = False, 0
            else:
                return None
        if not network:
            left.update({limit.name: 0 for limit in LIMITS if limit.per_network})
        return Caps.of(
            left,
            network=NetworkMode.PROXY if network else NetworkMode.NONE,
            net_allow=self.net_allow if network else (),
        )


def _room_for_one(limit: Limit, left: float) -> bool:
    """Whether ``left`` under a ceiling still admits a VM (a rate must be finite: at least 1)."""
    if limit.unit is Unit.SHARE:
        return left > _SHARE_EPSILON
    return left >= max(limit.least, 1 if limit.unit.zero_is_unlimited else 0)


def _used(running: Iterable[Caps]) -> dict[str, float]:
    """What the VMs running use of each limit; a VM without network uses none of its budget."""
    vms = list(running)
    return {
        limit.name: sum(
            c.amount(limit.name)
            for c in vms
            if limit.additive and (c.network is NetworkMode.PROXY or not limit.per_network)
        )
        for limit in LIMITS
    }


def _outside(entries: Sequence[str], allowed: AllowList) -> list[str]:
    """The entries a request names that are malformed or not within ``allowed``."""
    outside = []
    for entry in entries:
        try:
            rule = AllowRule.parse(entry)
        except InvalidAllowRule:
            outside.append(repr(entry))
            continue
        if not allowed.covers(rule):
            ip = rule.ip
            internal = ip is not None and is_internal(ip)
            outside.append(
                f"{rule} (internal: only an exact rule allows it)" if internal else str(rule)
            )
    return outside


def _exceeds(label: str, asked: float, in_use: float, allowed: float, unit: Unit) -> str:
    if in_use == 0:
        return (
            f"{label} {_shown(asked, unit)} exceeds the lender's limit of {_shown(allowed, unit)}"
        )
    left = max(allowed - in_use, 0)
    return (
        f"{label} {_shown(asked, unit)} exceeds what is left of the lender's limit of "
        f"{_shown(allowed, unit)} ({_shown(in_use, unit)} in use, {_shown(left, unit)} left)"
    )


def _shown(value: float, unit: Unit) -> str:
    """An amount for people: sizes and rates in IEC units ("90 TiB", "9.54 MiB/s")."""
    if unit is Unit.SIZE:
        return human_size(int(value) * MIB)
    if unit is Unit.RATE:
        return human_size(int(value)) + "/s"
    return _num(value) + str(unit.value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
