"""Topologies of the network lab, and the plan (namespaces, commands, shaped links) that builds one.

Pure data, no I/O: :func:`plan` turns a :class:`Topology` and a unique prefix into the ``ip``,
``tc`` and ``iptables`` commands that build it, so the address plan can be checked without root.

Address plan (all inside 198.18.0.0/15, the benchmarking range; nothing routes out):

- the public segment is 198.18.0.0/24, a bridge in the switch namespace ``<prefix>sw``; public
  hosts are 198.18.0.10, .11, ...; home routers' WAN sides are 198.18.0.100, .101, ...;
- home ``j`` (counting from 1) is 198.19.j.0/24 behind its router ``<prefix>r-<home>`` (198.19.j.1,
  the LAN bridge is in the router), its hosts 198.19.j.10, .11, ...; the router masquerades what
  leaves its WAN side. No namespace has a default route except home hosts (to their router), so
  the public side has no route into any home and one home none into another.

A link with delay or loss is a pair of TAP devices joined by the lab's userspace forwarder
(:mod:`tests.netlab.forwarder`; this kernel has no netem); any other link is a veth pair. A rate
is a ``tbf`` on both ends' egress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

PUBLIC_NET = "198.18.0"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
MAX_HOSTS = 80
TBF_BURST = 15_000  # bytes: ten full frames, so a short measurement is not flattered by bursts
TBF_LATENCY = "200ms"

Nat = Literal["port-preserving", "random"]


class TopologyError(ValueError):
    """A topology that cannot be built (a bad name, too many hosts, a bad link parameter)."""


@dataclass(frozen=True)
class LinkSpec:
    delay_ms: float = 0.0  # one way, in each direction
    loss: float = 0.0  # probability a frame is dropped, in each direction
    rate_mbit: float | None = None  # each direction

    @property
    def shaped(self) -> bool:
        return self.delay_ms > 0 or self.loss > 0

    def check(self, where: str) -> None:
        if not 0 <= self.delay_ms <= 10_000:
            raise TopologyError(f"{where}: delay_ms must be within 0..10000")
        if not 0 <= self.loss < 1:
            raise TopologyError(f"{where}: loss must be within 0..1")
        if self.rate_mbit is not None and not 0.01 <= self.rate_mbit <= 10_000:
            raise TopologyError(f"{where}: rate_mbit must be within 0.01..10000")


@dataclass(frozen=True)
class HostSpec:
    name: str
    link: LinkSpec = LinkSpec()


@dataclass(frozen=True)
class HomeSpec:
    name: str
    hosts: tuple[HostSpec, ...]
    uplink: LinkSpec = LinkSpec()  # the router's WAN link to the public segment
    nat: Nat = "port-preserving"  # "random": MASQUERADE --random-fully, a symmetric-like NAT


@dataclass(frozen=True)
class Topology:
    name: str
    public: tuple[HostSpec, ...]
    homes: tuple[HomeSpec, ...] = ()


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ip: str
    home: str | None  # None: on the public segment


@dataclass(frozen=True)
class Router:
    home: str
    netns: str
    wan_ip: str
    lan: str  # "198.19.j.0/24"
    nat: Nat


@dataclass(frozen=True)
class TapLink:
    """Two TAP devices the forwarder joins, with this delay and loss in each direction."""

    a_netns: str
    a_dev: str
    b_netns: str
    b_dev: str
    delay_ms: float
    loss: float


@dataclass
class Plan:
    prefix: str
    switch: str
    namespaces: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    hosts: dict[str, Host] = field(default_factory=dict)
    routers: dict[str, Router] = field(default_factory=dict)
    taps: list[TapLink] = field(default_factory=list)
    # host or home -> (namespace, device, bridge) of its link's far end: the port that cuts it off
    ports: dict[str, tuple[str, str, str]] = field(default_factory=dict)


def _check_names(topology: Topology) -> None:
    names = [h.name for h in topology.public]
    for home in topology.homes:
        names += [home.name, *(h.name for h in home.hosts)]
    for name in names:
        if not NAME_RE.match(name):
            raise TopologyError(f"{name!r}: names are 1-8 lowercase letters or digits")
    if "sw" in names:
        raise TopologyError("'sw' names the lab's switch; choose another name")
    if len(set(names)) != len(names):
        raise TopologyError("host and home names must all differ")
    if len(topology.public) > MAX_HOSTS or any(len(h.hosts) > MAX_HOSTS for h in topology.homes):
        raise TopologyError(f"at most {MAX_HOSTS} hosts per segment")
    if len(topology.homes) > 100:
        raise TopologyError("at most 100 homes")


def plan(topology: Topology, prefix: str) -> Plan:
    """The namespaces, commands and shaped links that build ``topology`` under ``prefix``."""
    _check_names(topology)
    p = Plan(prefix=prefix, switch=f"{prefix}sw")
    p.namespaces.append(p.switch)
    p.commands += [
        ["ip", "-n", p.switch, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", p.switch, "link", "set", "br0", "up"],
    ]
    for i, spec in enumerate(topology.public):
        spec.link.check(spec.name)
        ns = f"{prefix}{spec.name}"
        host = Host(spec.name, ns, f"{PUBLIC_NET}.{10 + i}", None)
        p.hosts[spec.name] = host
        p.namespaces.append(ns)
        _link(p, spec.link, (ns, "eth0"), (p.switch, f"p{i}"), "br0")
        p.ports[spec.name] = (p.switch, f"p{i}", "br0")
        p.commands.append(["ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
    for j, home in enumerate(topology.homes, start=1):
        home.uplink.check(f"home {home.name}'s uplink")
        rns = f"{prefix}r-{home.name}"
        router = Router(home.name, rns, f"{PUBLIC_NET}.{100 + j - 1}", f"198.19.{j}.0/24", home.nat)
        p.routers[home.name] = router
        p.namespaces.append(rns)
        _link(p, home.uplink, (rns, "wan"), (p.switch, f"h{j}"), "br0")
        p.ports[home.name] = (p.switch, f"h{j}", "br0")
        masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if home.nat == "random" else [])
        p.commands += [
            ["ip", "-n", rns, "addr", "add", f"{router.wan_ip}/24", "dev", "wan"],
            ["ip", "-n", rns, "link", "add", "lan", "type", "bridge"],
            ["ip", "-n", rns, "addr", "add", f"198.19.{j}.1/24", "dev", "lan"],
            ["ip", "-n", rns, "link", "set", "lan", "up"],
            ["ip", "netns", "exec", rns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            ["ip", "netns", "exec", rns, "iptables", "-t", "nat", "-A", "POSTROUTING",
             "-s", router.lan, "-o", "wan", *masquerade],
            # A router forwards its LAN's traffic out and only the replies back in.
            ["ip", "netns", "exec", rns, "iptables", "-P", "FORWARD", "DROP"],
            ["ip", "netns", "exec", rns, "iptables", "-A", "FORWARD", "-i", "lan", "-o", "wan",
             "-j", "ACCEPT"],
            ["ip", "netns", "exec", rns, "iptables", "-A", "FORWARD", "-m", "conntrack",
             "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ]  # fmt: skip
        for i, spec in enumerate(home.hosts):
            spec.link.check(spec.name)
            ns = f"{prefix}{spec.name}"
            host = Host(spec.name, ns, f"198.19.{j}.{10 + i}", home.name)
            p.hosts[spec.name] = host
            p.namespaces.append(ns)
            _link(p, spec.link, (ns, "eth0"), (rns, f"l{i}"), "lan")
            p.ports[spec.name] = (rns, f"l{i}", "lan")
            p.commands += [
                ["ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"],
                ["ip", "-n", ns, "route", "add", "default", "via", f"198.19.{j}.1"],
            ]
    # Loopback up everywhere; created first, so every later command finds its namespace.
    p.commands[:0] = [["ip", "netns", "add", ns] for ns in p.namespaces] + [
        ["ip", "-n", ns, "link", "set", "lo", "up"] for ns in p.namespaces
    ]
    return p


def _link(
    p: Plan, spec: LinkSpec, inner: tuple[str, str], outer: tuple[str, str], bridge: str
) -> None:
    """A link from ``inner`` (namespace, device) to ``outer``, whose end joins ``bridge``."""
    (ins, idev), (ons, odev) = inner, outer
    if spec.shaped:
        p.commands += [
            ["ip", "-n", ins, "tuntap", "add", "dev", idev, "mode", "tap"],
            ["ip", "-n", ons, "tuntap", "add", "dev", odev, "mode", "tap"],
        ]
        p.taps.append(TapLink(ins, idev, ons, odev, spec.delay_ms, spec.loss))
    else:
        p.commands.append(
            ["ip", "-n", ins, "link", "add", idev, "type", "veth", "peer", "name", odev,
             "netns", ons]
        )  # fmt: skip
    p.commands += [
        ["ip", "-n", ons, "link", "set", odev, "master", bridge],
        ["ip", "-n", ons, "link", "set", odev, "up"],
        ["ip", "-n", ins, "link", "set", idev, "up"],
    ]
    if spec.rate_mbit is not None:
        for ns, dev in (inner, outer):
            p.commands.append(
                ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", f"{spec.rate_mbit}mbit", "burst", str(TBF_BURST),
                 "latency", TBF_LATENCY]
            )  # fmt: skip


def two_homes(
    uplink: LinkSpec = LinkSpec(), *, nat_a: Nat = "port-preserving", nat_b: Nat = "port-preserving"
) -> Topology:
    """A scheduler and a relay-capable node in public; owner ``own`` behind NAT A, worker
    ``wrk`` behind NAT B; both homes' uplinks are ``uplink``."""
    return Topology(
        "two-homes",
        public=(HostSpec("sched"), HostSpec("relay")),
        homes=(
            HomeSpec("a", (HostSpec("own"),), uplink, nat_a),
            HomeSpec("b", (HostSpec("wrk"),), uplink, nat_b),
        ),
    )


def public_only(count: int, link: LinkSpec = LinkSpec()) -> Topology:
    """``count`` hosts ``n0``, ``n1``, ... on the public segment, each behind ``link``; with a
    delay d, any two of them are 4*d apart in round trip."""
    return Topology("public", public=tuple(HostSpec(f"n{i}", link) for i in range(count)))


def named(name: str, link: LinkSpec, count: int = 4) -> Topology:
    """The topologies ``scripts/netlab up`` knows by name."""
    if name == "two-homes":
        return two_homes(link)
    if name == "two-homes-symmetric":
        return two_homes(link, nat_a="random", nat_b="random")
    if name == "public":
        return public_only(count, link)
    raise TopologyError(f"unknown topology {name!r} (two-homes, two-homes-symmetric, public)")


NAMES = ("two-homes", "two-homes-symmetric", "public")
