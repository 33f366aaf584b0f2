"""A real guest against the lender's word: the backend runs under a lending policy whose list is
"*" plus one local test server, named exactly. A task naming the host's own address is refused
before anything boots; a guest asking for the metadata address and the host's own address
through the egress proxy is refused, and reaches the server the lender named."""

from __future__ import annotations

import functools

import pytest
import trio

from catalog.caps import Caps, NetworkMode
from node.allow_rules import IPAddress
from tests.vm.conftest import VmFactory
from worker_role.egress_proxy import host_addresses
from worker_role.policy import LendingPolicy, PolicyViolation
from worker_role.vm import GuestCommand

pytestmark = pytest.mark.vm


def _host_address() -> IPAddress:
    """A non-loopback IPv4 address of this host, for a listener the guest must not reach."""
    for ip in sorted(host_addresses(), key=str):
        if ip.version == 4 and not ip.is_loopback and not ip.is_link_local:
            return ip
    raise AssertionError(f"this host has no non-loopback IPv4 address: {host_addresses()}")


async def test_guest_is_refused_the_metadata_and_host_addresses_but_reaches_what_the_lender_named(
    vms: VmFactory,
) -> None:
    own = _host_address()
    reached: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            reached.append(await stream.receive_some(4096))
            body = b"hello from the lender's server\n"
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            await stream.send_all(body)

    async with trio.open_nursery() as nursery:
        local = (
            await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        )[0]
        mine = (await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host=str(own))))[0]
        port, own_port = local.socket.getsockname()[1], mine.socket.getsockname()[1]
        vms.backend.policy = LendingPolicy(
            network_allowed=True, net_allow=("*", f"127.0.0.1:{port}")
        )

        # Asked by name in the task: refused by the policy, before a VM exists.
        naming_own = Caps(network=NetworkMode.PROXY, net_allow=("*", f"{own}:{own_port}"))
        naming_metadata = Caps(network=NetworkMode.PROXY, net_allow=("169.254.169.254:80",))
        for caps in (naming_own, naming_metadata):
            with pytest.raises(PolicyViolation, match="internal: only an exact rule allows it"):
                await vms.run(GuestCommand(argv=("true",), timeout_s=10), caps)

        # Reached for under "*": refused by the proxy. QEMU's guestfwd carries one connection at
        # a time and reconnects to the proxy 1 s after one ends, hence the pauses.
        script = f"""
            wget -q -O - http://169.254.169.254/latest/meta-data/; echo metadata=$?; sleep 1.5
            wget -q -O - http://{own}:{own_port}/; echo own=$?; sleep 1.5
            wget -q -O - http://127.0.0.1:{port}/; echo named=$?
        """
        caps = Caps(network=NetworkMode.PROXY, net_allow=("*", f"127.0.0.1:{port}"))
        result = await vms.run(GuestCommand(argv=("sh", "-c", script), timeout_s=120), caps)
        nursery.cancel_scope.cancel()
    out = result.stdout.decode()
    assert "metadata=1\n" in out, out
    assert "own=1\n" in out, out
    assert "hello from the lender's server\nnamed=0\n" in out, out
    assert result.stderr.count(b"403") == 2, result.stderr
    assert len(reached) == 1  # only the lender's server, never the host's own address
    assert result.egress is not None
    assert result.egress.refused == 2
