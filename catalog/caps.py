"""Resource caps: what one VM may use, and the one comparison of a request with what is allowed.

This is part of the contract between the roles. An owner asks for :class:`Caps`; the scheduler
matches them against a worker's offer, the worker's lending policy checks them again, and the VM
backend applies them. Matching and policy both ask :meth:`Allowance.violations`, so a lease is
never refused on arrival for a reason the scheduler could have seen. Pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from node.allow_rules import AllowList, AllowRule, InvalidAllowRule
from node.errors import LocalProtocolError
from node.wire_fields import MAX_TEXT, as_int, as_map, as_seconds, as_text, as_tuple, check_keys

MIB = 1024 * 1024
MAX_NET_ALLOW = 64
# cpu_share is a float; sums of floats drift by an ulp, which must not turn "exactly the limit" into
# a refusal, nor let remaining() offer a share that violations() then refuses.
_SHARE_EPSILON = 1e-9
MIN_MEMORY_MIB = 32


class NetworkMode(StrEnum):
    """How a guest reaches the outside: not at all, or only through the worker's egress proxy."""

    NONE = "none"
    PROXY = "proxy"


@dataclass(frozen=True, slots=True, kw_only=True)
class Caps:
    """Limits for one VM.

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
        if self.vcpus < 1:
            raise ValueError(f"vcpus must be >= 1, got {self.vcpus}")
        if not 0 < self.cpu_share <= self.vcpus:
            raise ValueError(f"cpu_share must be in (0, vcpus={self.vcpus}], got {self.cpu_share}")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise ValueError(f"memory_mib must be >= {MIN_MEMORY_MIB}, got {self.memory_mib}")
        if self.disk_mib < 1:
            raise ValueError(f"disk_mib must be >= 1, got {self.disk_mib}")
        for name in ("disk_bps", "disk_iops", "net_bps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "network", NetworkMode(self.network))
        object.__setattr__(self, "net_allow", tuple(self.net_allow))

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
        try:
            return cls(
                vcpus=as_int("vcpus", value["vcpus"], 1, 1024),
                cpu_share=as_seconds("cpu_share", value["cpu_share"]),  # positive and finite
                memory_mib=as_int("memory_mib", value["memory_mib"], MIN_MEMORY_MIB, 2**40),
                disk_mib=as_int("disk_mib", value["disk_mib"], 1, 2**40),
                disk_bps=as_int("disk_bps", value["disk_bps"], 0, 2**62),
                disk_iops=as_int("disk_iops", value["disk_iops"], 0, 2**62),
                network=NetworkMode(as_text("network", value["network"])),
                net_bps=as_int("net_bps", value["net_bps"], 0, 2**62),
                net_allow=as_tuple("net_allow", value["net_allow"], MAX_NET_ALLOW, _allow_entry),
            )
        except ValueError as e:  # Caps' own checks, and an unknown network mode
            raise LocalProtocolError(f"caps: {e}") from None


_CAPS_KEYS = {f.name for f in fields(Caps)}


def _allow_entry(value: object) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise LocalProtocolError(f"a net_allow entry must be a str of <= {MAX_TEXT} characters")
    return value


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
    """Ceilings on the *sum* of the caps of every VM running plus the one asked for.

    Rates (``disk_bps``, ``disk_iops``, ``net_bps``) of ``None`` mean no limit; when set, a request
    must carry its own finite rate (0, "unlimited", is refused). ``net_allow`` of ``None`` lets a
    request name any destination; otherwise each one it names must fall within one of its rules.
    """

    vcpus: int
    cpu_share: float
    memory_mib: int
    disk_mib: int
    disk_bps: int | None = None
    disk_iops: int | None = None
    net_bps: int | None = None
    network: bool = False
    net_allow: tuple[str, ...] | None = None

    @classmethod
    def room(cls, room: Caps) -> Allowance:
        """Exactly what one VM of at most ``room`` may use (a rate of 0 in ``room``: no limit).

        An offer's ``net_allow`` of ``("*",)`` stands for a lender with no allow-list."""
        network = room.network is NetworkMode.PROXY
        return cls(
            vcpus=room.vcpus,
            cpu_share=room.cpu_share,
            memory_mib=room.memory_mib,
            disk_mib=room.disk_mib,
            disk_bps=room.disk_bps or None,
            disk_iops=room.disk_iops or None,
            net_bps=(room.net_bps or None) if network else None,
            network=network,
            net_allow=None if "*" in room.net_allow else room.net_allow,
        )

    def violations(self, request: Caps, running: Sequence[Caps] = ()) -> list[Violation]:
        """Every ceiling ``request`` would exceed next to ``running`` (empty: it fits)."""
        found: list[Violation] = []
        used = _Totals.of(running)
        for limit, label, unit in _ADDITIVE:
            allowed = getattr(self, limit)
            if allowed is None or (limit == "net_bps" and request.network is NetworkMode.NONE):
                continue
            asked, in_use = getattr(request, limit), getattr(used, limit)
            if limit in _RATES and asked == 0:
                message = f"{label} unlimited exceeds the lender's limit of {_num(allowed)}{unit}"
            elif in_use + asked > allowed + (_SHARE_EPSILON if limit == "cpu_share" else 0):
                message = _exceeds(label, asked, in_use, allowed, unit)
            else:
                continue
            found.append(Violation(limit, message, asked=asked, in_use=in_use, allowed=allowed))
        if request.network is NetworkMode.PROXY and not self.network:
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
        return found

    def remaining(self, running: Sequence[Caps] = ()) -> Caps | None:
        """The largest single VM still allowed next to ``running``, or ``None`` if none is.

        Rates left when a limit is set are finite; with no limit they are 0 (unlimited), as in Caps.
        The network is offered only when allowed and, with a rate limit, only if some rate is left.
        """
        used = _Totals.of(running)
        vcpus = self.vcpus - used.vcpus
        cpu_share = min(self.cpu_share - used.cpu_share, float(vcpus))
        memory_mib = self.memory_mib - used.memory_mib
        disk_mib = self.disk_mib - used.disk_mib
        disk_bps = 0 if self.disk_bps is None else self.disk_bps - used.disk_bps
        disk_iops = 0 if self.disk_iops is None else self.disk_iops - used.disk_iops
        if (
            vcpus < 1
            or cpu_share <= _SHARE_EPSILON
            or memory_mib < MIN_MEMORY_MIB
            or disk_mib < 1
            or (self.disk_bps is not None and disk_bps <= 0)
            or (self.disk_iops is not None and disk_iops <= 0)
        ):
            return None
        net_bps = 0 if self.net_bps is None else self.net_bps - used.net_bps
        network = self.network and (self.net_bps is None or net_bps > 0)
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


# (field, label, unit) of the limits that add up over the VMs running, in the order reported.
_ADDITIVE = (
    ("vcpus", "vCPUs", ""),
    ("cpu_share", "CPU share", " host CPUs"),
    ("memory_mib", "memory", " MiB"),
    ("disk_mib", "disk", " MiB"),
    ("disk_bps", "disk rate", " B/s"),
    ("disk_iops", "disk operations", " IOPS"),
    ("net_bps", "network rate", " B/s"),
)
_RATES = frozenset({"disk_bps", "disk_iops", "net_bps"})


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
