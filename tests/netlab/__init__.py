"""The network lab: namespaces, NAT routers and shaped links for tests that leave loopback."""
