"""Which address a data channel listens on and is reached at, for IPv4 and IPv6 nodes."""

from __future__ import annotations

import pytest

from catalog.blob_service import data_host_for
from catalog.transfer_links import channel_host, ip_of

PEER = "/p2p/12D3KooWQepr3NFHJAwaoYG6ifUJLmXojM5RahBFRPZdZNxuH3N5"


def test_ip_of_reads_ip4_and_ip6_multiaddrs_only() -> None:
    assert str(ip_of("/ip4/10.0.0.7/tcp/4001" + PEER)) == "10.0.0.7"
    assert str(ip_of("/ip6/::1/tcp/4001")) == "::1"
    assert str(ip_of("/ip6/2001:db8::5/tcp/1")) == "2001:db8::5"
    for other in ("/dns4/example.com/tcp/1", "/ip4/::1/tcp/1", "/ip6/10.0.0.1/tcp/1", "/ip4/x/"):
        assert ip_of(other) is None, other


def test_the_channel_listens_where_libp2p_does() -> None:
    assert data_host_for(["/dns4/a.example/tcp/1", "/ip6/::/tcp/0"]) == "::"
    assert data_host_for(["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0"]) == "0.0.0.0"
    assert data_host_for(["/dns4/a.example/tcp/1"]) is None  # no channel: chunks on libp2p


def test_an_unspecified_ticket_host_is_the_providers_known_address_of_that_family() -> None:
    known = ["/ip4/192.0.2.1/tcp/1" + PEER, "/ip6/2001:db8::9/tcp/1" + PEER]
    assert channel_host("198.51.100.4", known) == "198.51.100.4"  # named: used as it is
    assert channel_host("0.0.0.0", known) == "192.0.2.1"
    assert channel_host("::", known) == "2001:db8::9"
    with pytest.raises(ValueError, match="no IPv6 address"):
        channel_host("::", known[:1])
    with pytest.raises(ValueError, match="not an IP address"):
        channel_host("evil.example", known)  # a ticket names an IP, never a name to resolve
