"""node.units: sizes, rates and durations as people write them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.units import (
    GIB,
    KIB,
    MAX_SIZE,
    MIB,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("512B", 512),
        ("512MiB", 512 * MIB),
        ("512mib", 512 * MIB),
        ("512 MiB", 512 * MIB),
        ("2GiB", 2 * GIB),
        ("2G", 2 * GIB),
        ("2Gi", 2 * GIB),
        ("1.5G", 3 * GIB // 2),
        ("0.5KiB", 512),
        ("4K", 4096),
        ("10MB", 10_000_000),
        ("1kB", 1000),
        ("1GB", 10**9),
        ("1TiB", 1024**4),
        ("1PB", 10**15),
        (" 7 ", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "lots",
        "-1",
        "-1GiB",
        "1.2.3",
        "1XB",
        "GiB",
        "1e6",
        "0.3B",
        "1.0000001K",
        "inf",
        "nan",
        "1 2",
        "9" * 40,
        "9" * 5000,
        "½G",
        "1_000",
        "١٢MiB",
    ],
)
def test_parse_size_rejects_garbage_naming_the_input(text: str) -> None:
    with pytest.raises(ValueError, match="size") as info:
        parse_size(text)
    assert repr(text)[:30] in str(info.value)


def test_parse_size_wants_a_string() -> None:
    with pytest.raises(TypeError):
        parse_size(5)  # type: ignore[arg-type]


def test_max_size_is_accepted_one_more_is_not() -> None:
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    with pytest.raises(ValueError, match="too large"):
        parse_size(str(MAX_SIZE + 1))


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (512, "512B"),
        (1000, "1000B"),
        (1025, "1025B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (512 * MIB, "512MiB"),
        (3 * GIB // 2, "1.5GiB"),
        (10**7, "9765.625KiB"),
        (GIB + 1, f"{GIB + 1}B"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_format_size_rejects_non_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="not a size"):
        format_size(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=2**30), st.sampled_from(["B", "KiB", "MiB", "GiB"]))
def test_whole_iec_units_round_trip_to_the_same_spelling(n: int, unit: str) -> None:
    value = parse_size(f"{n}{unit}")
    assert value == n * {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB}[unit]
    assert parse_size(format_size(value)) == value


def test_rates() -> None:
    assert parse_rate("10MiB/s") == 10 * MIB
    assert parse_rate("10MiB") == 10 * MIB
    assert parse_rate("0") == 0
    assert format_rate(10 * MIB) == "10MiB/s"
    with pytest.raises(ValueError, match="'fast'"):
        parse_rate("fast")
    with pytest.raises(ValueError, match="rate"):
        parse_rate("-1MiB/s")


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_rate_round_trip(n: int) -> None:
    assert parse_rate(format_rate(n)) == n


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("90", 90.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("1m30.5s", 90.5),
        ("1d", 86400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("0.1s", 0.1),
        (" 2s ", 2.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "soon",
        "-1",
        "-5s",
        "1e3",
        "5M",
        "5 s",
        "30m1h",
        "1m1m",
        "1h-30m",
        "s",
        "1.s",
        "inf",
        "nan",
        "5sec",
        "1h30",
        "9" * 2000,
        "١٢s",
        "١٢",
    ],
)
def test_parse_duration_rejects_garbage_naming_the_input(text: str) -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(text)
    assert repr(text)[:30] in str(info.value)


def test_huge_duration_is_refused_not_infinite() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "h")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (0.0005, "0.5ms"),
        (1.0, "1s"),
        (90.0, "1m30s"),
        (90.5, "1m30.5s"),
        (5400.0, "1h30m"),
        (3600.0, "1h"),
        (86400.0, "24h"),
        (3601, "1h1s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), True, "1s"])
def test_format_duration_rejects_non_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        format_duration(bad)  # type: ignore[arg-type]


@given(st.floats(min_value=0, max_value=1e15, allow_nan=False, allow_infinity=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**9))
def test_whole_milliseconds_read_naturally(ms: int) -> None:
    text = format_duration(ms / 1000)
    assert "e" not in text
    assert parse_duration(text) == ms / 1000
    if ms < 1000:
        assert text == f"{ms}ms" if ms else text == "0s"
