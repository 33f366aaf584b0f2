"""The kinds of value ``node.toml`` holds, each with its parser and the words for what it expects.

A :class:`Kind` turns a raw TOML (or command-line) value into the typed value the config holds, or
raises :class:`BadValue` with a message of the form ``expected <what>, got <value>``;
``node.config`` adds the file and the dotted key. Kept apart from ``node.config`` so that module
stays the readable list of sections and keys. Nothing here imports libp2p: multiaddrs and peer IDs
are checked for shape only, which is what catches typos in a config file.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from node import units
from node.allow_rules import AllowRule, InvalidAllowRule


class BadValue(ValueError):
    """A value of the wrong type or shape; the message says what was expected and what came."""


class Role(StrEnum):
    WORKER = "worker"
    SCHEDULER = "scheduler"
    OWNER = "owner"


@dataclass(frozen=True, slots=True)
class Kind:
    """How one key's raw value becomes a typed one.

    ``from_text`` maps a command-line string to what TOML would have held (``"2"`` -> 2,
    ``"a,b"`` -> ``["a", "b"]``), so flags go through the very same checks as files.
    """

    expected: str
    parse: Callable[[object], Any]
    from_text: Callable[[str], object] = str
    is_list: bool = False


def show(value: object) -> str:
    """A value as TOML would spell it, for error messages: ``"lots"``, ``true``, ``[1, 2]``."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _fail(kind_expected: str, value: object, where: str = "") -> BadValue:
    return BadValue(f"expected {kind_expected}, got {show(value)}{where}")


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python; `max_vcpus = true` must not read as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _int_from_text(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        return text


def _float_from_text(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def integer(minimum: int, maximum: int = 2**31 - 1) -> Kind:
    expected = f"an integer from {minimum} to {maximum}"

    def parse(value: object) -> int:
        # bool is an int subclass in Python; `max_vcpus = true` must not read as 1.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(expected, value)
        if not minimum <= value <= maximum:
            raise _fail(expected, value)
        return value

    return Kind(expected, parse, _int_from_text)


def number(*, above: float, maximum: float) -> Kind:
    expected = f"a number above {above} and at most {maximum}"

    def parse(value: object) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise _fail(expected, value)
        result = float(value)  # type: ignore[arg-type]
        if not above < result <= maximum:
            raise _fail(expected, value)
        return result

    return Kind(expected, parse, _float_from_text)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _bool_from_text(text: str) -> object:
    lowered = text.strip().lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else text


def boolean() -> Kind:
    def parse(value: object) -> bool:
        if not isinstance(value, bool):
            raise _fail("true or false", value)
        return value

    return Kind("true or false", parse, _bool_from_text)


def text(*, max_len: int = 64) -> Kind:
    expected = f"a string of at most {max_len} printable characters"

    def parse(value: object) -> str:
        if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
            raise _fail(expected, value)
        return value

    return Kind(expected, parse)


def choice(*options: str) -> Kind:
    expected = "one of " + ", ".join(f'"{o}"' for o in options)

    def parse(value: object) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise _fail(expected, value)
        return value.lower()

    return Kind(expected, parse)


def _units_kind(expected: str, convert: Callable[[str], Any], *, allow_number: bool) -> Kind:
    def parse(value: object) -> Any:
        if isinstance(value, str):
            try:
                return convert(value)
            except ValueError:
                raise _fail(expected, value) from None
        if allow_number and (_is_int(value) or isinstance(value, float)):
            try:
                return convert(str(value))
            except ValueError:
                raise _fail(expected, value) from None
        raise _fail(expected, value)

    return Kind(expected, parse)


def size(*, minimum: int = 0) -> Kind:
    expected = 'a size like "512MiB"'
    if minimum:
        expected += f" of at least {units.format_size(minimum)}"
    base = _units_kind(expected, units.parse_size, allow_number=True)

    def parse(value: object) -> int:
        result: int = base.parse(value)
        if result < minimum:
            raise _fail(expected, value)
        return result

    return Kind(expected, parse)


def rate() -> Kind:
    return _units_kind(
        'a rate like "10MiB/s" ("0" = unlimited)', units.parse_rate, allow_number=True
    )


def duration(*, zero_means: str | None = None) -> Kind:
    """A duration above zero, or also zero when ``zero_means`` says what zero stands for."""
    if zero_means is None:
        expected = 'a duration above zero like "90s", "5m", "1h30m" or "250ms"'
    else:
        expected = f'a duration like "90s", "5m", "1h30m" or "1d" ("0" = {zero_means})'
    base = _units_kind(expected, units.parse_duration, allow_number=True)

    def parse(value: object) -> float:
        result: float = base.parse(value)
        if result < 0 or (result == 0 and zero_means is None):
            raise _fail(expected, value)
        return result

    return Kind(expected, parse)


def absolute_path() -> Kind:
    expected = "an absolute path"

    def parse(value: object) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise _fail(expected, value)
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise _fail(expected, value)
        return path

    return Kind(expected, parse)


def list_of(item: Kind, item_expected: str, *, most: int | None = None) -> Kind:
    """A TOML array of ``item``; duplicates dropped (first kept), order kept; at most ``most``
    items when given (a list that travels to peers is bounded on the wire too)."""
    expected = f"a list of {item_expected}"
    if most is not None:
        expected = f"a list of at most {most} {item_expected}"

    def parse(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _fail(expected, value)
        if most is not None and len(value) > most:
            raise _fail(expected, f"{len(value)} items")
        result: list[Any] = []
        for index, raw in enumerate(value):
            try:
                parsed = item.parse(raw)
            except BadValue:
                raise _fail(expected, raw, f" (item {index + 1})") from None
            if parsed not in result:
                result.append(parsed)
        return tuple(result)

    def from_text(text: str) -> object:
        return [part.strip() for part in text.split(",") if part.strip()]

    return Kind(expected, parse, from_text, is_list=True)


def peer_weights() -> Kind:
    """A TOML table ``{ "<peer id>" = weight, ... }``: positive integer weights by peer ID.

    Held as a tuple of ``(peer id, weight)`` pairs sorted by peer ID, so the config stays frozen.
    On the command line: ``ID=2,ID=1``.
    """
    expected = 'a table of peer IDs to positive integer weights, like { "12D3KooW..." = 2 }'
    weight = integer(1, 1_000_000)

    def parse(value: object) -> tuple[tuple[str, int], ...]:
        if not isinstance(value, dict):
            raise _fail(expected, value)
        result: list[tuple[str, int]] = []
        for peer, raw in value.items():
            if not isinstance(peer, str) or not is_peer_id(peer):
                raise _fail(expected, peer, " (not a peer ID)")
            try:
                result.append((peer, weight.parse(raw)))
            except BadValue:
                raise _fail(expected, raw, f" (the share of {peer})") from None
        return tuple(sorted(result))

    def from_text(text: str) -> object:
        table: dict[str, object] = {}
        for part in (p.strip() for p in text.split(",")):
            if part:
                peer, _, raw = part.partition("=")
                table[peer.strip()] = _int_from_text(raw.strip())
        return table

    return Kind(expected, parse, from_text)


# --- list items -----------------------------------------------------------------------------


def _checked(predicate: Callable[[str], bool]) -> Callable[[object], Any]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or not predicate(value):
            raise BadValue("bad item")
        return value

    return parse


def _parse_role(value: object) -> Role:
    if not isinstance(value, str):
        raise BadValue("bad role")
    try:
        return Role(value)
    except ValueError:
        raise BadValue("bad role") from None


ROLE = Kind('"worker", "scheduler" or "owner"', _parse_role)

_B58 = "[1-9A-HJ-NP-Za-km-z]"
# An Ed25519 key's peer ID (identity multihash, "12D3KooW...") or a sha256 one ("Qm...").
_PEER_ID_RE = re.compile(f"(?:12D3KooW{_B58}{{44}}|Qm{_B58}{{44}})")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_HEX_KEY_RE = re.compile(r"[0-9a-fA-F]{64}")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def is_peer_id(value: str) -> bool:
    return _PEER_ID_RE.fullmatch(value) is not None


def _is_hostname(value: str) -> bool:
    labels = value.split(".")
    return 0 < len(value) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _is_ip(version: int, value: str) -> bool:
    try:
        return ipaddress.ip_address(value).version == version
    except ValueError:
        return False


def _is_port(value: str, *, allow_zero: bool) -> bool:
    return _PORT_RE.fullmatch(value) is not None and (0 if allow_zero else 1) <= int(value) <= 65535


def is_multiaddr(value: str, *, dialable: bool) -> bool:
    """``/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>`` (vmlend speaks TCP only).

    ``dialable`` (a bootstrap peer): a host name is allowed, the port is not 0 and the address
    must end in ``/p2p/<peer id>`` so the Noise handshake can check who answered. Otherwise (a
    listen address): an IP literal, port 0 allowed, no ``/p2p`` part.
    """
    parts = value.split("/")
    if parts[0] != "" or len(parts) not in (5, 7):
        return False
    _, net, host, transport, port, *rest = parts
    host_ok = (
        (net == "ip4" and _is_ip(4, host))
        or (net == "ip6" and _is_ip(6, host))
        or (dialable and net in ("dns", "dns4", "dns6") and _is_hostname(host))
    )
    if not host_ok or transport != "tcp" or not _is_port(port, allow_zero=not dialable):
        return False
    if dialable:
        return len(rest) == 2 and rest[0] == "p2p" and is_peer_id(rest[1])
    return not rest


LISTEN_ADDR = Kind(
    'a listen multiaddr like "/ip4/0.0.0.0/tcp/4001"',
    _checked(lambda v: is_multiaddr(v, dialable=False)),
)
BOOTSTRAP_ADDR = Kind(
    'a multiaddr ending in /p2p/<peer id> like "/dns4/host/tcp/4001/p2p/12D3KooW..."',
    _checked(lambda v: is_multiaddr(v, dialable=True)),
)
PEER_ID = Kind('a peer ID like "12D3KooW..."', _checked(is_peer_id))


def _parse_public_key(value: object) -> str:
    if not isinstance(value, str) or _HEX_KEY_RE.fullmatch(value) is None:
        raise BadValue("bad key")
    # One spelling, so the same key given twice in two cases is one publisher, not two.
    return value.lower()


PUBLIC_KEY = Kind("an Ed25519 public key as 64 hex digits", _parse_public_key)


def _is_destination(value: str) -> bool:
    try:
        AllowRule.parse(value)
    except InvalidAllowRule:
        return False
    return True


NET_ALLOW = Kind(
    'a destination like "example.com:443", "*.debian.org" or "[2001:db8::1]:80"',
    _checked(_is_destination),
)
