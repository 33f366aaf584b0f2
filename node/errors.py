"""The project-wide exception tree.

Every error vmlend raises on purpose derives from :class:`VmlendError`. Each package adds its own
subtree (``catalog.errors``, ``worker_role.errors``, ``scheduler_role.errors``); third-party
exceptions (libp2p, libvirt, sqlite) are translated into these at the boundary that calls them.
The names follow trio's convention of saying whose fault an error is.
"""

from __future__ import annotations


class VmlendError(Exception):
    """Root of every error vmlend raises on purpose."""


class ConfigError(VmlendError):
    """The configuration (a file, a flag or an environment variable) is invalid."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.key = key


class IdentityError(VmlendError):
    """The node's key file is missing, unreadable, malformed or too open."""


class StoreError(VmlendError):
    """The state database failed or holds something it should not."""


class ProtocolError(VmlendError):
    """A wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (our bug or our caller's)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (malformed, oversized, unknown)."""


class NetworkError(VmlendError):
    """Something outside us failed: a peer, a link, a socket."""


class PeerUnreachableError(NetworkError):
    """No connection could be made to the peer."""


class StreamBrokenError(NetworkError):
    """The stream ended abnormally (reset, killed peer, end of stream mid-message)."""


class DeadlineError(NetworkError):
    """A peer did not answer before the deadline the caller set (e.g. a frozen peer)."""


class RpcError(VmlendError):
    """A local RPC call failed; ``code`` is a stable machine-readable name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
