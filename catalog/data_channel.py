"""The direct data channel: chunk bytes on plain TCP beside libp2p, for peers authorised there.

Why: libp2p streams (Noise + yamux in Python) carry ~60-80 MB/s here; loopback TCP carries
GB/s. Chunks verify themselves by hash, so public bytes need no channel security; what must not
leak is *who may read*: a token's grant names the chunks its peer may read, and for a private
blob carries a key (handed over the Noise-encrypted libp2p stream) that every answer is
encrypted with (ChaCha20-Poly1305).

Both ends keep the bytes off the event loop: the provider serves each connection from a thread
of its own (``sendfile`` from the chunk files), and the fetcher reads each connection in a
thread that splices answers into spool files and hashes them there.

Authorisation: a peer asks over its authenticated libp2p stream (``TICKET_PROTOCOL``) and gets
a one-time 32-byte token bound to its peer ID; it opens a TCP connection, sends the token first,
and only then may ask for chunks. A token is consumed on first use and expires after
``TOKEN_TTL`` seconds; a connection with a wrong token is closed unanswered.

Wire, after the token (all integers big-endian)::

    request  = op:u8 (1 = get) | chunk_id:32
    response = status:u8 (0 = ok, 1 = not found) | chunk_id:32 | length:u32 | data[length]

Responses come in request order (requests may be pipelined). The reader checks each header
against the request at the head of the queue and refuses lengths over ``MAX_CHUNK_SIZE``.

This module holds the wire format and the tokens; the two ends are
:class:`catalog.data_channel_server.DataServer` and
:class:`catalog.data_channel_client.DataConnection`.
"""

from __future__ import annotations

import secrets
import socket
import struct
from dataclasses import dataclass, field

import trio

from catalog.chunking import ID_SIZE, ChunkId

TICKET_PROTOCOL = "/vmlend/chunk-channel/1.0.0"
TOKEN_SIZE = 32
TOKEN_TTL = 60.0
MAX_TOKENS_PER_PEER = 16
OP_GET = 1
STATUS_OK, STATUS_NOT_FOUND = 0, 1
REQUEST = struct.Struct(f">B{ID_SIZE}s")
HEADER = struct.Struct(f">B{ID_SIZE}sI")
SOCKET_BUFFER = 4 << 20
KEY_SIZE = 32
TAG_SIZE = 16
POLL_INTERVAL = 0.1  # seconds a connection's thread blocks on its socket before checking for cancel
_TIMEO = struct.pack("ll", 0, int(POLL_INTERVAL * 1_000_000))


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token allows: ``peer`` may read the chunks in ``scope`` (all if None); with a
    ``key``, every chunk is sent encrypted (ChaCha20-Poly1305, nonce = answer number)."""

    peer: str
    scope: frozenset[ChunkId] | None = None
    key: bytes | None = None


@dataclass
class TokenBook:
    """One-time tokens, each bound to a grant and an expiry. Sans-IO: time is passed in."""

    ttl: float = TOKEN_TTL
    per_peer: int = MAX_TOKENS_PER_PEER
    _tokens: dict[bytes, tuple[Grant, float]] = field(default_factory=dict)

    def issue(
        self,
        peer_id: str,
        now: float,
        *,
        scope: frozenset[ChunkId] | None = None,
        key: bytes | None = None,
    ) -> bytes:
        self._expire(now)
        mine = [t for t, (g, _) in self._tokens.items() if g.peer == peer_id]
        for old in mine[: max(0, len(mine) - self.per_peer + 1)]:
            del self._tokens[old]  # a peer holds at most per_peer live tokens
        token = secrets.token_bytes(TOKEN_SIZE)
        self._tokens[token] = (Grant(peer_id, scope, key), now + self.ttl)
        return token

    def redeem(self, token: bytes, now: float) -> Grant | None:
        """The grant the token was issued with, once; None if unknown, used or expired."""
        self._expire(now)
        entry = self._tokens.pop(token, None)
        return entry[0] if entry is not None else None

    def _expire(self, now: float) -> None:
        for token in [t for t, (_, expiry) in self._tokens.items() if expiry <= now]:
            del self._tokens[token]


def nonce(number: int) -> bytes:
    """The ChaCha20-Poly1305 nonce of a connection's answer ``number`` (counted from 0)."""
    return number.to_bytes(12, "big")


def blocking_socket(stream: trio.SocketStream) -> socket.socket:
    """Take the socket out of trio: blocking, with send and receive timeouts of POLL_INTERVAL,
    so that a thread blocked on it notices a cancel."""
    sock = socket.socket(fileno=stream.socket.detach())
    try:
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEO)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEO)
    except BaseException:
        sock.close()
        raise
    return sock


__all__ = [
    "KEY_SIZE",
    "TICKET_PROTOCOL",
    "TokenBook",
]
