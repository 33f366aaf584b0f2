"""The resource limits, one row each: what one VM is given and what a lender bounds over its VMs.

Every layer that speaks of limits reads :data:`LIMITS` rather than listing them: the checks and
wire form of :class:`catalog.caps.Caps`, the comparison the scheduler's matching and the worker's
lending policy share (:class:`catalog.caps.Allowance`), the lender's ``[worker]`` keys in
``node.toml`` (:mod:`node.config`), the ``[resources]`` keys of a task file
(:mod:`catalog.taskfile`), the task's wire form (:mod:`catalog.task_wire`), the task's caps
(``catalog.build.assemble.default_caps``) and the caps an image manifest records.

Adding a limit touches three places:

1. a row of :data:`LIMITS` here;
2. its typed field, with its default, on :class:`catalog.caps.Caps`;
3. its enforcement in the VM backend (``worker_role/vm``).

Besides, the documentation tests ask for a line on each of its keys: its ``[worker]`` key in
:mod:`node.config`'s docstring and in ``node.toml.example``, and its ``[resources]`` key (if a
task file may set it) in :mod:`catalog.taskfile`'s docstring. ``tests/test_limits.py`` checks
every row against each of these places. The caps' wire form gains a key: peers and stored tasks
without it are refused, as any change of a message's fields is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

from node.units import GIB, MIB

__all__ = ["LIMITS", "Amounts", "Limit", "Unit", "limit_named"]


class Unit(Enum):
    """How a limit is counted and written; the value is its unit in messages (``"512 MiB"``)."""

    COUNT = ""
    """Whole things (vCPUs), at least :attr:`Limit.least`."""
    SHARE = " host CPUs"
    """A fraction above 0 (host CPUs' worth of time), kept to thousandths in a task's caps."""
    SIZE = " MiB"
    """Whole MiB in caps; a size such as ``"256MiB"`` (:func:`node.units.parse_size`) where
    people write it, which a task rounds up to whole MiB and a lender's ceiling down."""
    RATE = " B/s"
    """Bytes per second, ``"10MiB/s"`` where people write it; 0 is unlimited."""
    IOPS = " IOPS"
    """Disk operations per second; 0 is unlimited."""

    @property
    def zero_is_unlimited(self) -> bool:
        return self in (Unit.RATE, Unit.IOPS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """One limit: its names in each layer, its unit and its bounds (in the caps' unit)."""

    name: str
    """Its :class:`~catalog.caps.Caps` field, its key on the caps' wire, ``Violation.limit``."""
    label: str
    """What messages call it: ``"memory 512 MiB exceeds the lender's limit of 256 MiB"``."""
    unit: Unit
    least: int
    """The least one VM may have (a share: more than this)."""
    most: int
    """The most one VM may state on the wire."""
    config_key: str
    """The lender's key in ``node.toml``'s ``[worker]``, which bounds all lent VMs together."""
    config_default: float
    """That key's default, as written there (a size in bytes; 0 where 0 is unlimited)."""
    task_key: str | None = None
    """The owner's key in a task file's ``[resources]``; None when a task cannot set it."""
    at_most: str | None = None
    """Another limit this one may not exceed, in one VM and in a lender's ceilings; a task file
    that leaves this one out asks that one's amount (a CPU share: at most, by default, the vCPUs).
    It comes earlier in :data:`LIMITS`."""
    per_network: bool = False
    """Counts only for VMs with network, whose traffic the egress proxy meters."""
    additive: bool = True
    """The lender's ceiling bounds the sum over its VMs; otherwise each VM on its own."""

    @property
    def integral(self) -> bool:
        return self.unit is not Unit.SHARE

    def typed(self, amount: float) -> float:
        """``amount`` as the caps hold it: an int, or a float for a share."""
        return float(amount) if self.unit is Unit.SHARE else int(amount)

    def from_written(self, written: float) -> float:
        """A task's amount as written (a size in bytes) in the caps' unit: sizes rounded up to
        whole MiB and at least :attr:`least`, shares rounded to thousandths."""
        if self.unit is Unit.SIZE:
            return max(self.least, math.ceil(written / MIB))
        if self.unit is Unit.SHARE:
            return round(written * 1000) / 1000
        return written

    def to_written(self, amount: float) -> float:
        """An amount in the caps' unit as a task file or ``node.toml`` writes it."""
        return int(amount) * MIB if self.unit is Unit.SIZE else amount

    def ceiling(self, written: float) -> float | None:
        """A lender's written limit in the caps' unit (a size rounded down to whole MiB), or None
        when it sets no limit (0 where 0 is unlimited)."""
        if self.unit.zero_is_unlimited and written == 0:
            return None
        return int(written) // MIB if self.unit is Unit.SIZE else written


LIMITS: tuple[Limit, ...] = (
    Limit(
        name="vcpus", label="vCPUs", unit=Unit.COUNT, least=1, most=1024,
        config_key="max_vcpus", config_default=1, task_key="cpus",
    ),
    Limit(
        name="cpu_share", label="CPU share", unit=Unit.SHARE, least=0, most=1024,
        config_key="max_cpu_share", config_default=1.0, task_key="cpu_share", at_most="vcpus",
    ),
    Limit(
        name="memory_mib", label="memory", unit=Unit.SIZE, least=32, most=2**40,
        config_key="max_memory", config_default=1 * GIB, task_key="memory",
    ),
    Limit(
        name="disk_mib", label="disk", unit=Unit.SIZE, least=1, most=2**40,
        config_key="max_disk", config_default=2 * GIB, task_key="disk",
    ),
    Limit(
        name="disk_bps", label="disk rate", unit=Unit.RATE, least=0, most=2**62,
        config_key="max_disk_rate", config_default=0, task_key="disk_rate",
    ),
    Limit(
        name="disk_iops", label="disk operations", unit=Unit.IOPS, least=0, most=2**62,
        config_key="max_disk_iops", config_default=0,
    ),
    Limit(
        name="net_bps", label="network rate", unit=Unit.RATE, least=0, most=2**62,
        config_key="max_net_rate", config_default=0, per_network=True,
    ),
)  # fmt: skip
"""In the order refusals name them."""

_BY_NAME = {limit.name: limit for limit in LIMITS}


def limit_named(name: str) -> Limit:
    """The row of the limit ``name`` (a Caps field); KeyError for any other name."""
    return _BY_NAME[name]


class Amounts(Mapping[str, float]):
    """Amounts by name, immutable and hashable, so the frozen configs and policies holding them
    stay hashable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, float] | Iterable[tuple[str, float]] = ()) -> None:
        self._items: dict[str, float] = dict(items)

    def __getitem__(self, key: str) -> float:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Amounts({self._items!r})"
