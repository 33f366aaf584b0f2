"""The egress proxy's sans-IO parts: allow-list matching, request heads, the token bucket."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.allow_rules import (
    AllowList,
    AllowRule,
    DestinationRefused,
    EgressRules,
    InvalidAllowRule,
    embedded_ipv4,
    is_internal,
    normalize_host,
)
from worker_role.egress_errors import BadProxyRequest, RequestHeadTooLarge
from worker_role.egress_http import (
    ConnectRequest,
    ForwardRequest,
    find_head_end,
    parse_request_head,
    response,
)
from worker_role.token_bucket import TokenBucket

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.isdigit()
)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
ports = st.integers(1, 65535)


# ---- allow-list -------------------------------------------------------------------------------


@given(names, ports, ports)
def test_exact_rule_matches_that_name_and_port_only(name: str, port: int, other: int) -> None:
    allow = AllowList([f"{name}:{port}"])
    assert allow.permits(name, port)
    assert allow.permits(name.upper() + ".", port)  # case and a trailing dot do not matter
    assert allow.permits(name, other) is (other == port)
    assert not allow.permits("x" + name, port)
    assert not allow.permits("a." + name, port)


@given(names, ports)
def test_rule_without_port_matches_every_port(name: str, port: int) -> None:
    assert AllowList([name]).permits(name, port)


@given(names, st.lists(labels, min_size=1, max_size=3).map(".".join), ports)
def test_wildcard_matches_subdomains_only(suffix: str, sub: str, port: int) -> None:
    allow = AllowList([f"*.{suffix}:{port}"])
    assert allow.permits(f"{sub}.{suffix}", port)
    assert not allow.permits(suffix, port)
    # Ending with the same characters is not being under the domain.
    assert not allow.permits(f"{sub}{suffix}", port)
    assert not allow.permits(f"{sub}.{suffix}", port % 65535 + 1)


@given(st.lists(names | st.just("*"), max_size=3), st.lists(ports | st.none(), max_size=3))
def test_rules_round_trip_through_their_text(
    hosts: list[str], maybe_ports: list[int | None]
) -> None:
    for host, port in zip(hosts, maybe_ports, strict=False):
        rule = AllowRule(host, port)
        assert AllowRule.parse(str(rule)) == rule


rules = st.builds(
    AllowRule,
    st.sampled_from(["*", "*.a.org", "*.b.a.org", "a.org", "b.a.org", "c.b.a.org", "10.0.0.5"]),
    st.sampled_from([None, 80, 443]),
)
destinations = st.tuples(
    st.sampled_from(["a.org", "b.a.org", "c.b.a.org", "x.c.b.a.org", "ba.org", "10.0.0.5"]),
    st.sampled_from([80, 443, 8080]),
)


@given(rules, rules, destinations)
def test_a_covering_rule_allows_everything_the_covered_one_does(
    outer: AllowRule, inner: AllowRule, destination: tuple[str, int]
) -> None:
    if outer.covers(inner) and inner.matches(*destination):
        assert outer.matches(*destination)


def test_covers_examples() -> None:
    assert AllowRule.parse("*.a.org").covers(AllowRule.parse("*.b.a.org:443"))
    assert AllowRule.parse("*.a.org").covers(AllowRule.parse("*.a.org:443"))
    assert not AllowRule.parse("*.a.org").covers(AllowRule.parse("a.org"))
    assert not AllowRule.parse("*.a.org:443").covers(AllowRule.parse("b.a.org"))
    assert not AllowRule.parse("a.org").covers(AllowRule.parse("*"))
    assert AllowList(["*"]).covers(AllowRule.parse("93.184.215.14:80"))
    assert AllowList(["10.0.0.5"]).covers(AllowRule.parse("10.0.0.5:80"))


@pytest.mark.parametrize(
    "entry", ["169.254.169.254:80", "127.0.0.1:22", "[::1]:22", "10.0.0.5", "[::ffff:10.0.0.5]:80"]
)
def test_star_covers_no_internal_address(entry: str) -> None:
    # The finding: a lender's "*" let a task name 169.254.169.254:80 or 127.0.0.1:22.
    assert not AllowList(["*", "*:80", "*.org"]).covers(AllowRule.parse(entry))
    assert AllowList([entry]).covers(AllowRule.parse(entry))


def test_address_rules() -> None:
    allow = AllowList(["10.0.0.5:8080", "[::1]:80", "192.0.2.7"])
    assert allow.permits("10.0.0.5", 8080)
    assert not allow.permits("10.0.0.5", 8081)
    assert allow.permits("[::1]", 80)
    assert allow.permits("0:0:0:0:0:0:0:1", 80)
    assert allow.permits("::ffff:192.0.2.7", 1)  # the mapped form is the same address
    assert not AllowList(["*.0.0.5"]).permits("10.0.0.5", 80)  # wildcards never match addresses


@pytest.mark.parametrize(
    "entry", ["", "a:0", "a:65536", "a:http", "exa mple.org", "-a.org", "[::1", "[x]:80", "ü.de"]
)
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(InvalidAllowRule, match="bad allow-list entry"):
        AllowList([entry])


def test_empty_allow_list_allows_nothing() -> None:
    with pytest.raises(DestinationRefused):
        AllowList([]).check("example.org", 443)


def test_empty_lender_list_allows_nothing() -> None:
    # The finding: an empty lender list (with network_allowed) meant "anywhere".
    rules = EgressRules(lender=[], task=["*", "example.org:443"])
    with pytest.raises(DestinationRefused, match="not in the lender's allow-list"):
        rules.check("example.org", 443)


def test_a_destination_needs_both_lists() -> None:
    rules = EgressRules(lender=["*.debian.org:80", "pypi.org:443"], task=["*", "pypi.org"])
    rules.check("deb.debian.org", 80)
    rules.check("pypi.org", 443)
    with pytest.raises(DestinationRefused, match="not in the lender's allow-list"):
        rules.check("example.org", 80)  # the task's "*" does not widen the lender's list
    with pytest.raises(DestinationRefused, match="not in the lender's allow-list"):
        rules.check("pypi.org", 80)
    narrow = EgressRules(lender=["*"], task=["a.org:443"])
    with pytest.raises(DestinationRefused, match="not in the task's allow-list"):
        narrow.check("b.org", 443)  # the lender's "*" does not widen the task's list


INTERNAL = [
    "127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "10.1.2.3", "192.168.0.1",
    "172.16.0.1", "0.0.0.0", "::", "100.64.0.1", "224.0.0.1", "255.255.255.255", "fc00::1",
    "fd00::2", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::7f00:1",
    "::ffff:0:7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "fec0::1", "64:ff9b:1::5",
]  # fmt: skip


@pytest.mark.parametrize("address", INTERNAL)
def test_internal_addresses_need_the_lenders_explicit_word(address: str) -> None:
    named = normalize_host(address)
    shown = f"[{named}]" if ":" in named else named
    rules = EgressRules(lender=["*", "*.example.org:443"], task=["*", f"{shown}:443"])
    with pytest.raises(DestinationRefused, match="internal address"):
        rules.check_addresses("evil.example.org", 443, [address])
    with pytest.raises(DestinationRefused, match="internal address"):
        # One bad address among good ones is enough to refuse.
        rules.check_addresses("evil.example.org", 443, ["93.184.215.14", address])
    with pytest.raises(DestinationRefused, match="internal address"):
        # The task naming it is not enough: only the lender may open its inside.
        rules.check_addresses(named, 443, [address])
    explicit = EgressRules(lender=[f"{shown}:443"], task=["*"])
    assert explicit.check_addresses("example.org", 443, [address]) == [ipaddress.ip_address(named)]
    with pytest.raises(DestinationRefused, match="internal address"):
        explicit.check_addresses("example.org", 444, [address])  # named for another port


def test_a_name_the_lender_lists_exactly_may_resolve_inside() -> None:
    rules = EgressRules(lender=["intranet.lan:80", "*.lan:80", "*"], task=["*"])
    assert rules.check_addresses("intranet.lan", 80, ["10.0.0.5"])
    for host in ("other.lan", "evil.org"):  # a wildcard, or another name resolving there
        with pytest.raises(DestinationRefused, match=f"{host} resolves to 10.0.0.5"):
            rules.check_addresses(host, 80, ["10.0.0.5"])


def test_the_hosts_own_addresses_are_inside() -> None:
    own = frozenset({ipaddress.ip_address("1.2.3.4"), ipaddress.ip_address("2001:4860::8")})
    rules = EgressRules(lender=["*"], task=["*"])
    for host, addresses in [
        ("1.2.3.4", ["1.2.3.4"]),
        ("2001:4860::8", ["2001:4860::8"]),
        ("mine.example.org", ["93.184.215.14", "1.2.3.4"]),
        ("mapped.example.org", ["::ffff:1.2.3.4"]),
    ]:
        with pytest.raises(DestinationRefused, match="this host's own address"):
            rules.check_addresses(host, 80, addresses, own=own)
    assert rules.check_addresses("5.6.7.8", 80, ["5.6.7.8"], own=own)
    named = EgressRules(lender=["1.2.3.4:80"], task=["*"])
    assert named.check_addresses("1.2.3.4", 80, ["1.2.3.4"], own=own)


@given(st.ip_addresses())
def test_is_internal_covers_every_non_global_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    if not ip.is_global or ip.is_multicast:
        assert is_internal(ip)
    inner = embedded_ipv4(ip)
    if inner is not None and is_internal(inner):
        assert is_internal(ip)


rule_texts = st.sampled_from(
    ["*", "*:80", "*.a.org", "a.org", "a.org:80", "b.a.org", "10.0.0.5", "10.0.0.5:80", "1.2.3.4"]
)
address_texts = st.sampled_from(["10.0.0.5", "1.2.3.4", "5.6.7.8", "127.0.0.1", "::ffff:10.0.0.5"])


@given(
    st.lists(rule_texts, max_size=4),
    st.lists(rule_texts, max_size=4),
    st.sampled_from(["a.org", "b.a.org", "c.org", "10.0.0.5", "1.2.3.4", "5.6.7.8"]),
    st.sampled_from([80, 443]),
    st.lists(address_texts, min_size=1, max_size=3),
    st.booleans(),
)
def test_what_passes_is_within_both_lists_and_inside_only_by_the_lenders_word(
    lender: list[str],
    task: list[str],
    host: str,
    port: int,
    addresses: list[str],
    own_is_public: bool,
) -> None:
    own = frozenset({ipaddress.ip_address("1.2.3.4")} if own_is_public else ())
    rules = EgressRules(lender=lender, task=task)
    if host[0].isdigit():
        addresses = [host]  # an address asked for is the one connected to
    try:
        rules.check(host, port)
        ips = rules.check_addresses(host, port, addresses, own=own)
    except DestinationRefused:
        return
    assert AllowList(lender).permits(host, port)
    assert AllowList(task).permits(host, port)
    for ip in ips:
        if is_internal(ip) or ip in own:
            assert rules.lender.names_address(ip, port) or rules.lender.names_host(host, port)


def test_public_addresses_pass() -> None:
    rules = EgressRules(lender=["example.org:443"], task=["example.org:443"])
    ips = rules.check_addresses("example.org", 443, ["93.184.215.14"])
    assert ips == [ipaddress.ip_address("93.184.215.14")]


# ---- request heads ----------------------------------------------------------------------------


def test_connect_head() -> None:
    head = b"CONNECT Example.ORG:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n"
    assert parse_request_head(head) == ConnectRequest("example.org", 443)
    assert parse_request_head(b"CONNECT [::1]:22 HTTP/1.0\r\n\r\n") == ConnectRequest("::1", 22)


def test_forward_head_is_rewritten_to_origin_form() -> None:
    head = (
        b"GET http://Example.org:8080/a/b?q=1#frag HTTP/1.1\r\n"
        b"Host: wrong.example\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\n"
        b"Accept: */*\r\n\r\n"
    )
    request = parse_request_head(head)
    assert request == ForwardRequest(
        "example.org",
        8080,
        b"GET /a/b?q=1 HTTP/1.1\r\nHost: example.org:8080\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n",
    )
    plain = parse_request_head(b"GET http://example.org HTTP/1.0\r\n\r\n")
    assert plain == ForwardRequest(
        "example.org", 80, b"GET / HTTP/1.0\r\nHost: example.org\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    "head",
    [
        b"GET /relative HTTP/1.1\r\n\r\n",
        b"GET https://example.org/ HTTP/1.1\r\n\r\n",
        b"CONNECT example.org HTTP/1.1\r\n\r\n",
        b"CONNECT example.org:0 HTTP/1.1\r\n\r\n",
        b"CONNECT user@example.org:443 HTTP/1.1\r\n\r\n",
        b"GET http://example.org/ HTTP/2.0\r\n\r\n",
        b"GET  http://example.org/ HTTP/1.1\r\n\r\n",
        b"GET http://example.org/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET http://example.org/ HTTP/1.1\r\nNo colon\r\n\r\n",
        b"GET http://example.org/ HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
        b"GET http://exa_mple..org/ HTTP/1.1\r\n\r\n",
        b"GET http://example.org/\xff HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
        b"hello\r\n\r\n",
    ],
)
def test_malformed_heads_are_refused(head: bytes) -> None:
    with pytest.raises(BadProxyRequest):
        parse_request_head(head)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_bad_request(junk: bytes) -> None:
    try:
        request = parse_request_head(junk + b"\r\n\r\n")
    except BadProxyRequest:
        return
    assert 0 < request.port < 65536
    assert normalize_host(request.host) == request.host


def test_find_head_end() -> None:
    assert find_head_end(b"GET http://a/ HTTP/1.1\r\n", max_head=100) is None
    assert find_head_end(b"GET http://a/ HTTP/1.1\r\n\r\nbody", max_head=100) == 26
    with pytest.raises(RequestHeadTooLarge):
        find_head_end(b"x" * 100, max_head=100)


def test_responses() -> None:
    assert response(200) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    refused = response(403, "nope")
    assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert refused.endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\nnope\n")


# ---- token bucket -----------------------------------------------------------------------------


@given(
    st.integers(100, 1_000_000),
    st.integers(1, 100_000),
    st.lists(st.tuples(st.integers(0, 50_000), st.floats(0, 2)), max_size=40),
)
def test_bucket_never_lets_more_than_burst_plus_rate_times_time(
    rate: int, burst: int, steps: list[tuple[int, float]]
) -> None:
    """However reservations arrive, bytes released by time t <= burst + rate * t."""
    bucket = TokenBucket(rate, burst, now=0.0)
    now, released = 0.0, []
    for amount, gap in steps:
        now += gap
        delay = bucket.reserve(amount, now)
        assert delay >= 0
        # Each caller waits its delay; it never waits more than its own bytes plus the debt.
        released.append((now + delay, amount))
        now += delay  # one connection: the next reservation comes after this one's wait
    for t, _ in released:
        sent_by_t = sum(a for when, a in released if when <= t)
        assert sent_by_t <= burst + rate * t + 1e-6 * rate


@given(st.integers(100, 1_000_000), st.integers(1, 100), st.integers(1, 10_000))
def test_bucket_is_not_slower_than_the_rate(rate: int, count: int, size: int) -> None:
    """Back-to-back reservations finish by (total - burst) / rate: the cap is not undershot."""
    burst = 1000
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    for _ in range(count):
        now += bucket.reserve(size, now)
    assert now == pytest.approx(max(count * size - burst, 0) / rate, abs=1e-9)


def test_bucket_shared_by_concurrent_callers_queues_them() -> None:
    bucket = TokenBucket(1000, 1000, now=0.0)
    # Three callers at the same instant: the second and third queue behind the first's debt.
    assert [bucket.reserve(1000, 0.0) for _ in range(3)] == [0.0, 1.0, 2.0]
    assert bucket.tokens(1.0) == -1000.0  # in debt until the last caller's bytes are paid
    assert bucket.tokens(2.0) == 0.0
    assert bucket.tokens(100.0) == 1000.0  # idle time refills only up to the burst
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1, now=0.0)
