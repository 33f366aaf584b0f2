"""Resource caps: what one VM may use; shared by the lending policy, the VM backend, the agent."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MIB = 1024 * 1024


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
        if self.memory_mib < 32:
            raise ValueError(f"memory_mib must be >= 32, got {self.memory_mib}")
        if self.disk_mib < 1:
            raise ValueError(f"disk_mib must be >= 1, got {self.disk_mib}")
        for name in ("disk_bps", "disk_iops", "net_bps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
