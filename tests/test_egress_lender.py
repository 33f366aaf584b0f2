"""Egress within the lender's word, through a real proxy on real sockets: the lender's list and the
task's are intersected, an internal address or the host's own is reached only where the lender
names it, and a refused destination is logged once. (The same against a host address that is
public, in a network namespace of its own: tests/test_egress_host_address.py.)"""

from __future__ import annotations

import logging
from functools import partial

import pytest
import trio

from node.allow_rules import IPAddress, parse_ip
from tests.test_egress_proxy import ask, read_head, start_proxy, start_server
from worker_role import egress_proxy
from worker_role.egress_proxy import host_addresses


def _bindable_host_address() -> IPAddress:
    """A non-loopback address of this host that a listener can bind (the host has eth0)."""
    for ip in sorted(host_addresses(), key=lambda ip: (ip.version, str(ip))):
        if not ip.is_loopback and not ip.is_link_local:
            return ip
    raise AssertionError(f"this host has no non-loopback address: {host_addresses()}")


def _authority(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


async def _connect(port: int, authority: str) -> tuple[bytes, bytes]:
    return await ask(port, f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())


async def test_metadata_and_host_address_are_refused_while_the_lenders_word_works(
    nursery: trio.Nursery,
) -> None:
    # The task names the metadata address and the host's own address; the lender said "*" and
    # named one local test server. Only that server is reached.
    ok = await start_server(nursery, "echo")
    own = _bindable_host_address()
    accepted: list[bytes] = []

    async def on_host(stream: trio.SocketStream) -> None:
        accepted.append(await stream.receive_some(1024))

    listeners = await nursery.start(partial(trio.serve_tcp, on_host, 0, host=str(own)))
    own_port = listeners[0].socket.getsockname()[1]
    task = ["*", "169.254.169.254:80", _authority(own, own_port), f"127.0.0.1:{ok.port}"]
    proxy, port = await start_proxy(nursery, task, lender=["*", f"127.0.0.1:{ok.port}"])

    head, body = await _connect(port, "169.254.169.254:80")
    assert head.startswith(b"HTTP/1.1 403"), body
    assert b"169.254.169.254 is an internal address the lender's allow-list does not name" in body
    head, body = await _connect(port, _authority(own, own_port))
    assert head.startswith(b"HTTP/1.1 403"), body
    head, body = await ask(
        port, f"GET http://{_authority(own, own_port)}/ HTTP/1.1\r\n\r\n".encode()
    )
    assert head.startswith(b"HTTP/1.1 403"), body
    assert accepted == []

    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"CONNECT 127.0.0.1:{ok.port} HTTP/1.1\r\n\r\nping".encode())
        head, rest = await read_head(stream)
        assert head == b"HTTP/1.1 200 Connection established"
        while len(rest) < 4:
            rest += await stream.receive_some(1024)
        assert rest == b"ping"
    assert proxy.statistics().refused == 3


async def test_star_does_not_reach_loopback(nursery: trio.Nursery) -> None:
    echo = await start_server(nursery, "bulk", size=1)  # answers and closes: no hang if reached
    task = ["*", f"127.0.0.1:{echo.port}", f"[::1]:{echo.port}"]
    _, port = await start_proxy(nursery, task, lender=["*", "*.test"])
    for authority in (
        f"127.0.0.1:{echo.port}",
        f"[::ffff:127.0.0.1]:{echo.port}",
        f"[::1]:{echo.port}",
        f"0.0.0.0:{echo.port}",
        f"127.1:{echo.port}",  # a "name" the resolver reads as 127.0.0.1
        f"localhost:{echo.port}",
    ):
        head, body = await _connect(port, authority)
        assert head.startswith(b"HTTP/1.1 403"), (authority, body)
        assert b"internal address" in body, (authority, body)
    assert echo.received == []


async def test_an_empty_lender_list_allows_nothing(nursery: trio.Nursery) -> None:
    http = await start_server(nursery, "http")
    proxy, port = await start_proxy(nursery, ["*", f"127.0.0.1:{http.port}"], lender=[])
    head, body = await ask(port, f"GET http://127.0.0.1:{http.port}/ HTTP/1.1\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 403")
    assert body == f"127.0.0.1:{http.port} is not in the lender's allow-list\n".encode()
    assert http.received == []
    assert proxy.statistics().refused == 1


async def test_the_task_cannot_widen_the_lender_nor_the_lender_the_task(
    nursery: trio.Nursery,
) -> None:
    a, b = await start_server(nursery, "http"), await start_server(nursery, "http")
    both = [f"127.0.0.1:{a.port}"]
    _, wide_task = await start_proxy(nursery, ["*", f"127.0.0.1:{b.port}"], lender=both)
    _, wide_lender = await start_proxy(nursery, both, lender=[*both, f"127.0.0.1:{b.port}"])
    for port in (wide_task, wide_lender):
        head, _ = await ask(port, f"GET http://127.0.0.1:{b.port}/ HTTP/1.1\r\n\r\n".encode())
        assert head.startswith(b"HTTP/1.1 403")
        head, body = await ask(port, f"GET http://127.0.0.1:{a.port}/ HTTP/1.1\r\n\r\n".encode())
        assert (head[:12], body) == (b"HTTP/1.1 200", b"hello")
    assert b.received == []
    assert len(a.received) == 2


async def test_a_name_resolving_inside_is_refused_after_dns(nursery: trio.Nursery) -> None:
    echo = await start_server(nursery, "echo")
    answers = {
        "metadata.evil.test": ["169.254.169.254"],
        "mixed.evil.test": ["93.184.215.14", "127.0.0.1"],  # one bad address is enough
        "lan.evil.test": ["192.168.1.1"],
        "mapped.evil.test": ["::ffff:127.0.0.1"],
    }
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answers[host]

    _, port = await start_proxy(nursery, ["*"], lender=["*"], resolver=resolver)
    for name, addresses in answers.items():
        head, body = await _connect(port, f"{name}:{echo.port}")
        assert head.startswith(b"HTTP/1.1 403"), body
        expected = f"{name} resolves to {parse_ip(addresses[-1])}, an internal address"
        assert expected.encode() in body
    assert lookups == list(answers)  # one lookup per request: what is judged is what is dialled
    assert echo.received == []


async def test_a_refused_destination_is_logged_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmlend.worker.egress")
    monkeypatch.setattr(egress_proxy, "MAX_LOGGED_REFUSALS", 3)
    proxy, port = await start_proxy(nursery, ["*"], lender=["*"])

    def refusal_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "egress refused" in r.getMessage()]

    for _ in range(5):
        head, _ = await _connect(port, "169.254.169.254:80")
        assert head.startswith(b"HTTP/1.1 403")
    assert len(refusal_lines()) == 1
    assert "169.254.169.254 is an internal address" in refusal_lines()[0]
    for last_octet in range(1, 7):  # six more destinations: two logged, then the bound is said
        for _ in range(2):
            await _connect(port, f"10.0.0.{last_octet}:80")
    lines = refusal_lines()
    assert len(lines) == 4
    assert lines[-1] == "egress refused more than 3 destinations; further ones are counted only"
    assert proxy.statistics().refused == 5 + 12


async def test_unknown_host_addresses_refuse_rather_than_guess(nursery: trio.Nursery) -> None:
    http = await start_server(nursery, "http")
    broken = False

    def own() -> frozenset[IPAddress]:
        if broken:
            raise OSError("getifaddrs failed")
        return frozenset()

    allow = [f"127.0.0.1:{http.port}"]
    proxy, port = await start_proxy(nursery, allow, own_addresses=own)
    request = f"GET http://127.0.0.1:{http.port}/ HTTP/1.1\r\n\r\n".encode()
    head, _ = await ask(port, request)
    assert head.startswith(b"HTTP/1.1 200")
    broken = True
    head, body = await ask(port, request)
    assert head.startswith(b"HTTP/1.1 503"), body
    assert len(http.received) == 1
    assert proxy.statistics().failed == 1
