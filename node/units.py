"""Sizes and durations as people write them in ``node.toml`` and on the command line.

Sizes (:func:`parse_size`) are a non-negative number and an optional unit; the result is whole
bytes.

- a plain number, or ``B``: bytes (``1048576``, ``512B``);
- ``K`` ... ``P``, ``Ki`` ... ``Pi`` and ``KiB`` ... ``PiB``: powers of **1024** (IEC).
  The bare letters mean 1024 because that is how QEMU, libvirt and Docker read them (``2G`` of
  memory is 2 GiB everywhere a lender has seen it); ``KiB``... is the unambiguous spelling and what
  the ``format_*`` functions print;
- ``kB`` ``MB`` ``GB`` ``TB`` ``PB``: powers of **1000** (SI), as the IEC standard defines them, so
  ``10MB`` is 10,000,000 bytes.

Units are case-insensitive (``512mib`` works; bits are not a unit here, ``Mb`` is ``MB``). A
fraction is allowed when it comes to whole bytes (``1.5G``, ``0.5KiB``), anything else is an error
rather than a silent rounding. Rates (:func:`parse_rate`) are sizes per second, written with or
without ``/s``.

Durations (:func:`parse_duration`) are either a plain non-negative number of seconds (``90``,
``0.5``) or one or more ``<number><unit>`` parts with units ``d`` ``h`` ``m`` ``s`` ``ms`` in that
order, each at most once (``1h30m``, ``250ms``, ``1m30.5s``). The result is float seconds, what
trio's timeouts take.

The ``format_*`` functions give the inverse: ``parse_x(format_x(v)) == v`` for every value the
parser can return, and the output is what a person would write (``"1.5GiB"``, ``"1h30m"``).
Every parse error is a :class:`ValueError` whose message quotes the input.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = [
    "format_duration",
    "format_rate",
    "format_size",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4
PIB = 1024**5

# The largest size we accept: what sqlite, libvirt and struct "q" can all hold.
MAX_SIZE = 2**63 - 1
# Longer text is refused up front: no real value needs it, and Python refuses to turn more than
# 4300 digits into an int anyway (with a message that would not quote the input).
MAX_TEXT = 1000

_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _exp, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = 1024**_exp
    _SIZE_UNITS[_letter + "i"] = 1024**_exp
    _SIZE_UNITS[_letter + "ib"] = 1024**_exp
    _SIZE_UNITS[_letter + "b"] = 1000**_exp

# Largest first: format_size picks the largest unit that still gives a short exact number.
_IEC_NAMES = [(PIB, "PiB"), (TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")]

# re.ASCII: \d would otherwise match any Unicode digit ("١٢"), which nobody means in a config file.
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", re.ASCII)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)", re.ASCII)
_DURATION_UNITS: dict[str, Fraction] = {
    "d": Fraction(86400),
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_ORDER = list(_DURATION_UNITS)

SIZE_EXAMPLE = '"512MiB"'
DURATION_EXAMPLE = '"90s", "5m", "1h30m" or "250ms"'


def parse_size(text: str) -> int:
    """``"1.5G"`` -> 1610612736. See the module docstring for the units."""
    if not isinstance(text, str):
        raise TypeError(f"parse_size wants a str, got {type(text).__name__}")
    match = _SIZE_RE.fullmatch(text.strip()) if len(text) <= MAX_TEXT else None
    if match is None:
        raise ValueError(f"not a size: {text!r} (expected a number and a unit like {SIZE_EXAMPLE})")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ValueError(
            f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, TiB, or kB, MB, GB, TB)"
        )
    # Fractions, not floats or Decimals: exact for any length of input, so "1.5G" is exactly
    # 1.5 GiB and a long fraction cannot be rounded into looking whole.
    value = Fraction(number) * multiplier
    if value.denominator != 1:
        raise ValueError(f"size {text!r} is not a whole number of bytes ({float(value)})")
    if value > MAX_SIZE:
        raise ValueError(f"size {text!r} is too large")
    return int(value)


def parse_rate(text: str) -> int:
    """Bytes per second: ``"10MiB/s"`` or ``"10MiB"``; ``"0"`` is how config says "unlimited"."""
    if not isinstance(text, str):
        raise TypeError(f"parse_rate wants a str, got {type(text).__name__}")
    stripped = text.strip()
    if stripped.endswith("/s"):
        stripped = stripped[:-2]
    try:
        return parse_size(stripped)
    except ValueError:
        raise ValueError(
            f'not a rate: {text!r} (expected a size per second like "10MiB/s")'
        ) from None


def format_size(n: int) -> str:
    """The shortest exact spelling: 1610612736 -> ``"1.5GiB"``, 1000 -> ``"1000B"``.

    A unit is used only if the number comes out with at most three decimals, so the result is
    exact and reads naturally; otherwise the next smaller unit is tried, down to bytes.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"not a size in bytes: {n!r}")
    for unit, name in _IEC_NAMES:
        if n >= unit and (n * 1000) % unit == 0:
            return f"{_plain(Fraction(n, unit))}{name}"
    return f"{n}B"


def format_rate(n: int) -> str:
    return f"{format_size(n)}/s"


def parse_duration(text: str) -> float:
    """``"1h30m"`` -> 5400.0, ``"250ms"`` -> 0.25, ``"90"`` -> 90.0 (plain numbers are seconds)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_duration wants a str, got {type(text).__name__}")
    s = text.strip()
    if len(s) > MAX_TEXT:
        raise ValueError(f"not a duration: {text[:40]!r}... is too long")
    if _NUMBER_RE.fullmatch(s):
        return _finite(Fraction(s), text)
    total = Fraction(0)
    pos = 0
    last = -1
    while pos < len(s):
        match = _DURATION_PART_RE.match(s, pos)
        if match is None:
            raise ValueError(f"not a duration: {text!r} (expected e.g. {DURATION_EXAMPLE})")
        number, unit = match.groups()
        order = _DURATION_ORDER.index(unit)
        # Largest unit first and each once: "30m1h" or "1m1m" is more likely a typo than intent.
        if order <= last:
            raise ValueError(
                f"not a duration: {text!r} (units must go from largest to smallest, each once)"
            )
        last = order
        total += Fraction(number) * _DURATION_UNITS[unit]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"not a duration: {text!r} (expected e.g. {DURATION_EXAMPLE})")
    return _finite(total, text)


def format_duration(seconds: float) -> str:
    """5400.0 -> ``"1h30m"``, 0.25 -> ``"250ms"``, 90.5 -> ``"1m30.5s"``; exact, never rounded."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"not a duration in seconds: {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration in seconds: {seconds!r}")
    # repr() is the shortest string that reads back as the same float, so splitting its exact
    # decimal value into h/m/s loses nothing and parse_duration gets the very same float back.
    value = Fraction(repr(float(seconds)))
    if value == 0:
        return "0s"
    if value < 1:
        return f"{_plain(value * 1000)}ms"
    hours, rest = divmod(value, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{_plain(hours)}h")
    if minutes:
        parts.append(f"{_plain(minutes)}m")
    if secs:
        parts.append(f"{_plain(secs)}s")
    return "".join(parts)


def _plain(value: Fraction | int) -> str:
    """Exact decimal digits of a non-negative fraction whose denominator is 2^a * 5^b.

    Every value passed here comes from decimal text plus whole numbers, or a byte count over a
    power of two, so the expansion is finite: 3/2 -> "1.5", 1000 -> "1000", never an exponent.
    """
    places = 0
    while Fraction(value * 10**places).denominator != 1:
        places += 1
    scaled = str(int(value * 10**places)).rjust(places + 1, "0")
    if places == 0:
        return scaled
    whole, frac = scaled[:-places], scaled[-places:].rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def _finite(value: Fraction, text: str) -> float:
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"duration {text!r} is too large") from None
    if not math.isfinite(result):
        raise ValueError(f"duration {text!r} is too large")
    return result


def human_size(n: int) -> str:
    """A size for people, in IEC units to three significant digits: ``"90 TiB"``, ``"23.5 GiB"``,
    ``"512 B"`` (:func:`format_size` is exact and may run to many digits)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
