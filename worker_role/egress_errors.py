"""Errors of the guest's egress proxy; each refusal carries the HTTP status it answers with."""

from __future__ import annotations

from node.errors import DeadlineError, NetworkError, RemoteProtocolError, VmlendError


class EgressError(VmlendError):
    """Root of the egress proxy's own errors."""


class BadProxyRequest(RemoteProtocolError):
    """The guest sent a request head the proxy does not accept (the guest's fault)."""

    status = 400


class RequestHeadTooLarge(BadProxyRequest):
    """The guest's request head is longer than the proxy's limit."""

    status = 431


class UpstreamUnreachable(NetworkError):
    """The allowed destination could not be resolved or connected to."""

    status = 502


class UpstreamTimeout(DeadlineError):
    """The allowed destination did not accept the connection before the proxy's deadline."""

    status = 504


class HostAddressesUnknown(EgressError):
    """The host's own addresses could not be listed, so no destination can be judged safe."""

    status = 503
