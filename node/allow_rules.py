"""The allow-rule grammar, sans-IO: which destinations a guest may reach through the egress proxy.

The lender's config, the scheduler's matching and the worker's proxy all parse these rules, so
the grammar lives here, below every role.

Entries: ``example.org:443`` (that name, that port), ``*.debian.org:80`` (any name *under*
debian.org, at any depth, but not debian.org itself), ``10.0.0.5:8080`` / ``[::1]:80`` (that
address), ``host`` (any port), ``*`` or ``*:443`` (any name). Names compare case-insensitively and
without a trailing dot. A name is checked as asked; then every address it resolves to is checked
too, and an internal address (loopback, link-local, private, ...) is refused unless the allow-list
names that address itself: otherwise a guest could reach the worker's own services, or the lender's
LAN, through a DNS record pointing at them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from node.errors import VmlendError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidAllowRule(VmlendError, ValueError):
    """An allow-list entry (from the lender's policy or a task's request) is malformed."""


class DestinationRefused(VmlendError):
    """The guest asked for a destination the allow-list does not permit."""

    status = 403  # what the egress proxy answers with


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


def is_internal(ip: IPAddress) -> bool:
    """Whether ``ip`` is anything but public unicast (loopback, link-local, private, ...)."""
    return not ip.is_global or ip.is_multicast


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
        """Whether everything ``other`` allows, this rule allows too."""
        if self.port is not None and self.port != other.port:
            return False
        if self.host in ("*", other.host):
            return True
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

    def covers(self, rule: AllowRule) -> bool:
        """Whether some rule here allows everything ``rule`` allows."""
        return any(mine.covers(rule) for mine in self.rules)

    def check(self, host: str, port: int) -> None:
        """Raise :class:`DestinationRefused` unless the destination as asked is allowed."""
        if not self.permits(host, port):
            raise DestinationRefused(f"{host}:{port} is not in the allow-list")

    def check_addresses(self, host: str, port: int, addresses: Sequence[str]) -> list[IPAddress]:
        """The addresses ``host`` resolved to, once all are judged safe to connect to.

        Refused if any is internal and not named by the allow-list: with one bad address among
        good ones a later re-resolution or a fallback could still land on it.
        """
        ips: list[IPAddress] = []
        for text in addresses:
            ip = parse_ip(text)
            if ip is None:
                raise DestinationRefused(f"{host} resolved to {text!r}, not an address")
            if is_internal(ip) and not self.names_address(ip, port):
                raise DestinationRefused(
                    f"{host} resolves to internal address {ip}, which the allow-list does not name"
                )
            ips.append(ip)
        if not ips:
            raise DestinationRefused(f"{host} resolved to no address")
        return ips
