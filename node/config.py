"""The node's configuration: one frozen, typed :class:`Config`, built from four layers.

Later layers win: built-in defaults < ``bootstrap.toml`` < ``<data>/node.toml`` < command-line
flags. ``bootstrap.toml`` is the file shipped with vmlend (``$VMLEND_BOOTSTRAP`` names another);
``node.toml`` is the owner's. A key given in a later layer replaces the earlier value, except two
lists that ``node.toml`` *extends*: ``network.bootstrap``, ``network.trusted_schedulers`` and
``catalog.trusted_publishers`` (the shipped peers, schedulers and publishers stay and the owner can
add more). Flags replace even those, so
``--bootstrap ADDR`` means exactly that peer (to drop the shipped lists from a file, point
``$VMLEND_BOOTSTRAP`` at another file). An unknown section or key, a wrong type or a bad value is a
:class:`~node.errors.ConfigError` naming the file, the dotted key and what was expected, e.g.
``/x/node.toml: worker.max_memory: expected a size like "512MiB", got "lots"``.

Sizes are IEC unless written ``kB``/``MB``/``GB`` (see :mod:`node.units`); sizes and durations are
given as strings (``"2GiB"``, ``"1h30m"``) or plain numbers (bytes, seconds).

Every key, with its default (``node.toml.example`` at the repository root is the same list as a
commented sample file)::

    [node]
    roles = ["worker", "owner"]      # roles this node plays: "worker", "scheduler", "owner"
    name = ""                        # a name for people (tables, logs); need not be unique
    log_level = "info"               # "debug", "info", "warning" or "error"

    [network]
    listen = ["/ip4/127.0.0.1/tcp/0"]  # /ip4|ip6/<IP>/tcp/<port>; port 0 picks a free one
    bootstrap = []                   # peers dialled first, each ending in /p2p/<peer id>; EXTENDS
    heartbeat_interval = "2s"        # how often connected peers ping each other
    peer_timeout = "6s"              # silence after which a peer counts as gone (> heartbeat)
    dial_timeout = "5s"              # deadline for one connection attempt
    stream_deadline = "30s"          # deadline for one request/response on a stream
    max_inbound_streams = 256        # streams of one protocol that peers may have open here
    max_inbound_streams_per_peer = 16  # ... of which one peer may hold at most this many
    max_connections = 300            # connections with peers in all, both ways
    max_connections_per_peer = 3     # ... and with any one peer
    trusted_schedulers = []          # peer IDs of schedulers to prefer for tasks and work; EXTENDS

    [catalog]
    trusted_publishers = []          # Ed25519 public keys, 64 hex digits each; EXTENDS
    chunk_quota = "20GiB"            # disk the chunk store may fill
    peer_quota = "4GiB"              # what one peer may make this node store (task files,
                                     # results); past it, its requests are refused
    scrub_interval = "1d"            # how often every stored chunk is re-read and checked
                                     # (chunks are served unread: this notices rot); "0" = never
    scrub_rate = "16MiB/s"           # disk bytes/s a scrub may read; "0" = unlimited

    [worker]                         # the lending policy: no task may exceed it; every limit
                                     # bounds all lent VMs together, not each one
    max_vcpus = 1                    # vCPUs in all
    max_cpu_share = 1.0              # host CPUs in all; 0 < share <= max_vcpus
    max_memory = "1GiB"              # memory in all: guests' plus 64MiB per VM for the VM
                                     # itself (QEMU, TCG's cache); at least 32MiB
    max_disk = "2GiB"                # scratch disk in all; at least 1MiB
    max_concurrent_vms = 1           # VMs at once; 0 lends nothing
    network_allowed = false          # may a VM reach the network at all (via the egress proxy)
    net_allow = []                   # where it may go ([] = nowhere): "host[:port]", "*.domain",
                                     # "[v6]:port"; "*" = any public place; 127.0.0.1, the LAN,
                                     # 169.254.169.254, this host's addresses: only if named exactly
    max_net_rate = "0"               # egress in all, e.g. "1MiB/s"; "0" = unlimited
    max_disk_rate = "0"              # disk bytes/s in all; "0" = unlimited
    max_disk_iops = 0                # disk operations/s in all; 0 = unlimited
    schedulers = []                  # peer IDs of the schedulers to serve; [] = any
    shares = {}                      # { "<scheduler peer id>" = weight }: offers in proportion
                                     # to positive integer weights; unlisted schedulers weigh 1
    vm_dir = "/var/lib/vmlend/vm"    # VM-facing files; must be reachable by the libvirt-qemu user
    warm_budget = "1GiB"             # disk for snapshots of booted guests that tasks start from
                                     # instead of booting; "0" = always boot

    [scheduler]
    name = ""                        # the name this scheduler advertises
    lease_timeout = "30s"            # a lease with no heartbeat for this long expires
    min_quorum = 1                   # every task needs at least this many agreeing workers
    distinct_networks = true         # replicas of a task go to workers on different networks
                                     # (as this scheduler sees their connections); false only
                                     # for a lab where all workers share one address
    ipv4_prefix = 24                 # workers in one IPv4 /24 are one network
    ipv6_prefix = 48                 # workers in one IPv6 /48 are one network
    trust_after = 10                 # agreements in a row before a worker's result may decide
                                     # a task alone; 0 trusts every worker (a lab only)
    keep_finished = "7d"             # a finished task, its files and results are kept this long
                                     # after it ends for its owner, then forgotten (and the
                                     # owner's quota freed)

EXTENDS marks the two lists ``node.toml`` adds to instead of replacing.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import node
from node import config_kinds as k
from node.allow_rules import MAX_RULES
from node.config_kinds import Role
from node.data_dir import resolve_data_dir
from node.errors import ConfigError
from node.limits import LIMITS, Amounts, Limit, Unit, limit_named
from node.units import GIB, MIB, format_duration

__all__ = [
    "CatalogConfig",
    "Config",
    "NetworkConfig",
    "NodeConfig",
    "Role",
    "SchedulerConfig",
    "WorkerConfig",
    "default_bootstrap_path",
    "load_config",
    "resolve_data_dir",
]

log = logging.getLogger("vmlend.node.config")

NODE_TOML = "node.toml"
DEFAULTS = "defaults"
FLAGS = "command line"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    roles: tuple[Role, ...] = (Role.WORKER, Role.OWNER)
    name: str = ""
    log_level: str = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    heartbeat_interval: float = 2.0
    peer_timeout: float = 6.0
    dial_timeout: float = 5.0
    stream_deadline: float = 30.0
    max_inbound_streams: int = 256
    max_inbound_streams_per_peer: int = 16
    max_connections: int = 300
    max_connections_per_peer: int = 3
    trusted_schedulers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogConfig:
    trusted_publishers: tuple[str, ...] = ()  # lowercase hex
    chunk_quota: int = 20 * GIB
    peer_quota: int = 4 * GIB
    scrub_interval: float = 86400.0
    scrub_rate: int = 16 * MIB

    @property
    def trusted_publisher_keys(self) -> tuple[bytes, ...]:
        return tuple(bytes.fromhex(key) for key in self.trusted_publishers)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """The lending policy: nothing a task asks may exceed it.

    ``limits`` holds the key of each row of :data:`node.limits.LIMITS` (``max_memory``, ...) as
    written, sizes in bytes and rates in bytes/s; a key not given keeps its default.
    """

    limits: Mapping[str, float] = field(default_factory=dict)
    max_concurrent_vms: int = 1
    network_allowed: bool = False
    net_allow: tuple[str, ...] = ()
    schedulers: tuple[str, ...] = ()
    shares: tuple[tuple[str, int], ...] = ()
    vm_dir: Path = Path("/var/lib/vmlend/vm")
    warm_budget: int = 1 << 30

    def __post_init__(self) -> None:
        unknown = set(self.limits) - _LIMIT_DEFAULTS.keys()
        if unknown:
            raise ValueError(f"no limit has the key {', '.join(sorted(unknown))}")
        object.__setattr__(self, "limits", Amounts({**_LIMIT_DEFAULTS, **self.limits}))


_LIMIT_DEFAULTS = {limit.config_key: limit.config_default for limit in LIMITS}


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    name: str = ""
    lease_timeout: float = 30.0
    min_quorum: int = 1
    distinct_networks: bool = True
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    trust_after: int = 10
    keep_finished: float = 7 * 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything a node is told. ``sources`` lists the files that were read, in layer order."""

    data_dir: Path
    node: NodeConfig = field(default_factory=NodeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sources: tuple[str, ...] = ()

    def has_role(self, role: Role | str) -> bool:
        return Role(role) in self.node.roles


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeConfig,
    "network": NetworkConfig,
    "catalog": CatalogConfig,
    "worker": WorkerConfig,
    "scheduler": SchedulerConfig,
}


def _limit_kind(limit: Limit) -> k.Kind:
    """How a lender writes the ceiling on ``limit``: at least what one VM needs, except where 0
    means unlimited."""
    match limit.unit:
        case Unit.COUNT:
            return k.integer(limit.least, limit.most)
        case Unit.SHARE:
            return k.number(above=0.0, maximum=float(limit.most))
        case Unit.SIZE:
            return k.size(minimum=limit.least * MIB)
        case Unit.RATE:
            return k.rate()
        case Unit.IOPS:
            return k.integer(limit.least)


# One entry per key; the dataclasses above hold the defaults, this table how to read each key.
_SCHEMA: dict[str, dict[str, k.Kind]] = {
    "node": {
        "roles": k.list_of(k.ROLE, 'roles ("worker", "scheduler", "owner")'),
        "name": k.text(),
        "log_level": k.choice("debug", "info", "warning", "error"),
    },
    "network": {
        "listen": k.list_of(k.LISTEN_ADDR, 'listen multiaddrs like "/ip4/0.0.0.0/tcp/4001"'),
        "bootstrap": k.list_of(
            k.BOOTSTRAP_ADDR,
            'multiaddrs ending in /p2p/<peer id> like "/dns4/host/tcp/4001/p2p/12D3KooW..."',
        ),
        "heartbeat_interval": k.duration(),
        "peer_timeout": k.duration(),
        "dial_timeout": k.duration(),
        "stream_deadline": k.duration(),
        "max_inbound_streams": k.integer(1, 65536),
        "max_inbound_streams_per_peer": k.integer(1, 65536),
        "max_connections": k.integer(2, 65536),
        "max_connections_per_peer": k.integer(1, 64),
        "trusted_schedulers": k.list_of(k.PEER_ID, 'peer IDs like "12D3KooW..."'),
    },
    "catalog": {
        "trusted_publishers": k.list_of(k.PUBLIC_KEY, "Ed25519 public keys as 64 hex digits"),
        "chunk_quota": k.size(),
        "peer_quota": k.size(),
        "scrub_interval": k.duration(zero_means="never"),
        "scrub_rate": k.rate(),
    },
    "worker": {
        **{limit.config_key: _limit_kind(limit) for limit in LIMITS},
        "max_concurrent_vms": k.integer(0, 4096),
        "network_allowed": k.boolean(),
        "net_allow": k.list_of(k.NET_ALLOW, 'destinations like "example.com:443"', most=MAX_RULES),
        "schedulers": k.list_of(k.PEER_ID, 'peer IDs like "12D3KooW..."'),
        "shares": k.peer_weights(),
        "vm_dir": k.absolute_path(),
        "warm_budget": k.size(),
    },
    "scheduler": {
        "name": k.text(),
        "lease_timeout": k.duration(),
        "min_quorum": k.integer(1, 16),
        "distinct_networks": k.boolean(),
        "ipv4_prefix": k.integer(0, 32),
        "ipv6_prefix": k.integer(0, 128),
        "trust_after": k.integer(0, 1000),
        "keep_finished": k.duration(),
    },
}

# The lists node.toml adds to rather than replaces (see the module docstring).
_EXTENDED_BY_NODE_TOML = {
    ("network", "bootstrap"),
    ("network", "trusted_schedulers"),
    ("catalog", "trusted_publishers"),
}


def default_bootstrap_path(env: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """The ``bootstrap.toml`` to read and whether it must exist (it must when the user named it)."""
    env = os.environ if env is None else env
    named = env.get("VMLEND_BOOTSTRAP")
    if named:
        return Path(named).expanduser(), True
    return Path(node.__file__).parent.parent / "bootstrap.toml", False


def load_config(
    data_dir: Path,
    flags: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the config for the node whose data directory is ``data_dir``.

    ``flags`` maps dotted keys to the values of the flags actually given (``{"network.listen":
    ["/ip4/0.0.0.0/tcp/4001"], "node.roles": "worker,scheduler"}``); a string for a non-string key
    is read as a command-line word would be (``"2"``, ``"true"``, ``"a,b"`` for a list).
    ``env`` defaults to ``os.environ`` (only ``VMLEND_BOOTSTRAP`` is read here).
    Raises :class:`ConfigError` on anything unknown or invalid.
    """
    values: dict[str, dict[str, Any]] = {section: {} for section in _SCHEMA}
    origin: dict[tuple[str, str], str] = {}
    sources: list[str] = []

    bootstrap_path, required = default_bootstrap_path(env)
    node_toml = data_dir / NODE_TOML
    for path, must_exist, extend in ((bootstrap_path, required, False), (node_toml, False, True)):
        document = _read_toml(path, must_exist=must_exist)
        if document is None:
            continue
        sources.append(str(path))
        for (section, key), raw in _entries(document, str(path)):
            parsed = _parse(section, key, raw, str(path))
            if extend and (section, key) in _EXTENDED_BY_NODE_TOML and key in values[section]:
                parsed = tuple(dict.fromkeys(values[section][key] + parsed))
            values[section][key] = parsed
            origin[section, key] = str(path)

    for dotted, raw in (flags or {}).items():
        section, _, key = dotted.partition(".")
        _check_known(section, key, FLAGS, dotted)
        kind = _SCHEMA[section][key]
        value = kind.from_text(raw) if isinstance(raw, str) else raw
        values[section][key] = _parse(section, key, value, FLAGS)
        origin[section, key] = FLAGS

    worker = values["worker"]
    worker["limits"] = {key: worker.pop(key) for key in _LIMIT_DEFAULTS if key in worker}
    config = Config(
        data_dir=data_dir,
        sources=tuple(sources),
        **{name: cls(**values[name]) for name, cls in _SECTIONS.items()},
    )
    _check_together(config, origin)
    return config


def _read_toml(path: Path, *, must_exist: bool) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no such file (the data dir is checked later)
        if must_exist:
            raise ConfigError("file not found", source=str(path)) from None
        log.debug("no %s; skipping that layer", path)
        return None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=str(path)) from e
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", source=str(path)) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", source=str(path)) from e


def _entries(document: dict[str, Any], source: str) -> list[tuple[tuple[str, str], object]]:
    entries: list[tuple[tuple[str, str], object]] = []
    for section, table in document.items():
        if section not in _SCHEMA:
            raise ConfigError(
                f"unknown section [{section}] (known: {', '.join(_SCHEMA)})", source=source
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"expected a table [{section}], got {k.show(table)}", source=source, key=section
            )
        for key, raw in table.items():
            _check_known(section, key, source, f"{section}.{key}")
            entries.append(((section, key), raw))
    return entries


def _check_known(section: str, key: str, source: str, dotted: str) -> None:
    dotted = dotted or '""'  # an empty flag name would otherwise vanish from the message
    if section not in _SCHEMA:
        raise ConfigError(
            f"unknown section (known: {', '.join(_SCHEMA)})", source=source, key=dotted
        )
    if key not in _SCHEMA[section]:
        raise ConfigError(
            f"unknown key (known in [{section}]: {', '.join(_SCHEMA[section])})",
            source=source,
            key=dotted,
        )


def _parse(section: str, key: str, raw: object, source: str) -> Any:
    try:
        return _SCHEMA[section][key].parse(raw)
    except k.BadValue as e:
        raise ConfigError(str(e), source=source, key=f"{section}.{key}") from None


def _check_together(config: Config, origin: Mapping[tuple[str, str], str]) -> None:
    """Rules between keys, checked once every layer is in."""

    def fail(messages: dict[tuple[str, str], str]) -> ConfigError:
        # Blame the key set by the latest layer: that is the one the user changed last.
        rank = [DEFAULTS, *config.sources, FLAGS]
        key = max(messages, key=lambda key: rank.index(origin.get(key, DEFAULTS)))
        return ConfigError(messages[key], source=origin.get(key, DEFAULTS), key=".".join(key))

    worker, network = config.worker, config.network
    for limit in LIMITS:
        if limit.at_most is None:
            continue
        key, bound_key = limit.config_key, limit_named(limit.at_most).config_key
        value, bound = worker.limits[key], worker.limits[bound_key]
        if value > bound:
            raise fail(
                {
                    ("worker", key): f"expected at most worker.{bound_key} ({bound}), got {value}",
                    ("worker", bound_key): f"expected at least worker.{key} ({value}), got {bound}",
                }
            )
    if network.peer_timeout <= network.heartbeat_interval:
        raise fail(
            {
                ("network", "peer_timeout"): f"expected more than network.heartbeat_interval "
                f"({format_duration(network.heartbeat_interval)}), "
                f"got {format_duration(network.peer_timeout)}",
                ("network", "heartbeat_interval"): f"expected less than network.peer_timeout "
                f"({format_duration(network.peer_timeout)}), "
                f"got {format_duration(network.heartbeat_interval)}",
            }
        )
