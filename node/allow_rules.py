"""The allow-rule grammar, sans-IO: which destinations a guest may reach through the egress proxy.

The lender's config, the scheduler's matching and the worker's proxy all parse these rules, so
the grammar lives here, below every role.

Entries: ``example.org:443`` (that name, that port), ``*.debian.org:80`` (any name *under*
debian.org, at any depth, but not debian.org itself), ``10.0.0.5:8080`` / ``[::1]:80`` (that
address), ``host`` (any port), ``*`` or ``*:443`` (any name). Names compare case-insensitively and
without a trailing dot.

What a guest may reach (:class:`EgressRules`) is the intersection of the lender's list and the
task's: a destination must be allowed by both, by name as asked. Then every address it resolves to
is checked, after DNS and just before connecting, and an internal address (loopback, link-local
including the cloud metadata address 169.254.169.254, private, shared, ULA, unspecified, multicast,
an IPv6 form carrying one of these, or any address of the worker's host itself) is refused unless
the *lender* names it explicitly: by that address, or by the exact name the guest asked for. ``*``
and ``*.domain`` never reach one: otherwise a guest could reach the worker's own services, the
lender's LAN or the cloud's metadata service, directly or through a DNS record pointing at them.
An empty list allows nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from node.errors import VmlendError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidAllowRule(VmlendError, ValueError):
    """An allow-list entry (from the lender's policy or a task's request) is malformed."""


class DestinationRefused(VmlendError):
    """The guest asked for a destination the allow-list does not permit."""

    status = 403  # what the egress proxy answers with


# Rules in one allow-list: the lender's list travels in every offer's Caps, and each rule is
# checked for every connection a guest opens.
MAX_RULES = 64

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_NAME = 253


def parse_ip(text: str) -> IPAddress | None:
    """The address ``text`` spells in canonical form (IPv4-mapped IPv6 unwrapped), else None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0] if ":" in text else text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 reaches 127.0.0.1; it must be judged (and named) as that.
        return ip.ipv4_mapped
    return ip


def normalize_host(host: str) -> str:
    """``host`` lower-cased, without a trailing dot or IPv6 brackets; ValueError if not a host."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        ip = parse_ip(text[1:-1])
        if ip is None:
            raise ValueError(f"not an IP address in brackets: {host!r}")
        return str(ip)
    ip = parse_ip(text)
    if ip is not None:
        return str(ip)
    name = text.lower().removesuffix(".")
    if not name.isascii() or len(name) > _MAX_NAME or not _NAME_RE.fullmatch(name):
        raise ValueError(f"not a host name: {host!r}")
    return name


# Ranges Python's is_global (3.11) calls global that no guest may reach by a wildcard: site-local
# (deprecated, still routed on some LANs) and local-use NAT64 (RFC 8215), which maps into whatever
# the local translator chooses.
_INTERNAL_V6 = (ipaddress.IPv6Network("fec0::/10"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_V4_COMPATIBLE = bytes(12)
_V4_TRANSLATED = bytes(8) + b"\xff\xff\x00\x00"
_NAT64 = bytes.fromhex("0064ff9b") + bytes(8)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries in a form a host or a translator may deliver to it
    (mapped, compatible, translated, NAT64 64:ff9b::/96, 6to4, Teredo), else None."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    packed = ip.packed
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if packed[:12] in (_V4_COMPATIBLE, _V4_TRANSLATED, _NAT64):
        return ipaddress.IPv4Address(packed[12:])
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo is not None else None


def is_internal(ip: IPAddress) -> bool:
    """Whether ``ip`` is anything but public unicast (loopback, link-local, private, ...), or an
    IPv6 address carrying an internal IPv4 one."""
    if not ip.is_global or ip.is_multicast:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _INTERNAL_V6):
        return True
    inner = embedded_ipv4(ip)
    return inner is not None and is_internal(inner)


def is_own(ip: IPAddress, own: Collection[IPAddress]) -> bool:
    """Whether ``ip`` is one of ``own`` (the host's addresses), directly or carried in IPv6."""
    return ip in own or embedded_ipv4(ip) in own


def split_host_port(text: str, *, default_port: int | None) -> tuple[str, int | None]:
    """``host[:port]`` or ``[v6][:port]`` -> (host, port); ValueError if malformed."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        # No colon, or a bare IPv6 address (several colons): no port given.
        host, port_text = text, None
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {text!r}")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allow-list entry. ``host`` is a normalized name, ``*.suffix``, ``*`` or an address."""

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> AllowRule:
        text = entry.strip()
        try:
            host, port = split_host_port(text, default_port=None)
            if host == "*":
                return cls("*", port)
            if host.startswith("*."):
                return cls("*." + normalize_host(host[2:]), port)
            return cls(normalize_host(host), port)
        except ValueError as exc:
            raise InvalidAllowRule(f"bad allow-list entry {entry!r}: {exc}") from None

    @property
    def ip(self) -> IPAddress | None:
        return parse_ip(self.host)

    @property
    def explicit(self) -> bool:
        """Whether the rule names one host (an address or an exact name), not a wildcard."""
        return self.host != "*" and not self.host.startswith("*.")

    def matches(self, host: str, port: int) -> bool:
        """Whether the normalized ``host`` at ``port`` is allowed by this rule (by name)."""
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return parse_ip(host) is None and host.endswith(self.host[1:])
        return host == self.host

    def covers(self, other: AllowRule) -> bool:
        """Whether everything ``other`` allows, this rule allows too.

        ``*`` does not cover an internal address: it never reaches one (see the module's doc)."""
        if self.port is not None and self.port != other.port:
            return False
        if self.host == other.host:
            return True
        if self.host == "*":
            ip = other.ip
            return ip is None or not is_internal(ip)
        if not self.host.startswith("*.") or other.host == "*" or other.ip is not None:
            return False
        # "*.x" covers names under x and wildcards "*.x" / "*.y.x": all end with ".x".
        return other.host.endswith(self.host[1:])

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


class AllowList:
    """The destinations one VM's proxy lets through; empty allows nothing."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.rules: tuple[AllowRule, ...] = tuple(AllowRule.parse(e) for e in entries)

    def __repr__(self) -> str:
        return f"AllowList({[str(r) for r in self.rules]!r})"

    def permits(self, host: str, port: int) -> bool:
        """Whether the destination as asked (a name or an address) matches some rule."""
        try:
            name = normalize_host(host)
        except ValueError:
            return False
        return any(rule.matches(name, port) for rule in self.rules)

    def names_address(self, ip: IPAddress, port: int) -> bool:
        """Whether a rule names this very address (not a name or a wildcard) for ``port``."""
        return any(rule.ip == ip and rule.port in (None, port) for rule in self.rules)

    def names_host(self, host: str, port: int) -> bool:
        """Whether a rule names ``host`` exactly (an address or a name, not a wildcard)."""
        try:
            name = normalize_host(host)
        except ValueError:
            return False
        return any(r.explicit and r.host == name and r.port in (None, port) for r in self.rules)

    def covers(self, rule: AllowRule) -> bool:
        """Whether some rule here allows everything ``rule`` allows."""
        return any(mine.covers(rule) for mine in self.rules)

    def check(self, host: str, port: int) -> None:
        """Raise :class:`DestinationRefused` unless the destination as asked is allowed."""
        if not self.permits(host, port):
            raise DestinationRefused(f"{host}:{port} is not in the allow-list")


class EgressRules:
    """Where one VM's guest may go: what both the lender's and the task's lists allow, and an
    internal address or one of the host's own only where the lender names it explicitly."""

    def __init__(self, *, lender: Iterable[str], task: Iterable[str]) -> None:
        self.lender = AllowList(lender)
        self.task = AllowList(task)

    def __repr__(self) -> str:
        return f"EgressRules(lender={self.lender!r}, task={self.task!r})"

    def check(self, host: str, port: int) -> None:
        """Raise :class:`DestinationRefused` unless both lists allow the destination as asked."""
        if not self.task.permits(host, port):
            raise DestinationRefused(f"{host}:{port} is not in the task's allow-list")
        if not self.lender.permits(host, port):
            raise DestinationRefused(f"{host}:{port} is not in the lender's allow-list")

    def check_addresses(
        self,
        host: str,
        port: int,
        addresses: Sequence[str],
        *,
        own: Collection[IPAddress] = frozenset(),
    ) -> list[IPAddress]:
        """The addresses ``host`` resolved to, once all are judged safe to connect to; ``own``
        holds the addresses of the host the proxy runs on.

        Refused if any is internal or the host's own and the lender names neither it nor ``host``
        exactly: with one bad address among good ones a fallback could still land on it.
        """
        ips: list[IPAddress] = []
        for text in addresses:
            ip = parse_ip(text)
            if ip is None:
                raise DestinationRefused(f"{host} resolved to {text!r}, not an address")
            if is_internal(ip):
                what = "an internal address"
            elif is_own(ip, own):
                what = "this host's own address"
            else:
                ips.append(ip)
                continue
            if not (self.lender.names_address(ip, port) or self.lender.names_host(host, port)):
                said = f"{ip} is" if str(ip) == host else f"{host} resolves to {ip},"
                raise DestinationRefused(f"{said} {what} the lender's allow-list does not name")
            ips.append(ip)
        if not ips:
            raise DestinationRefused(f"{host} resolved to no address")
        return ips
