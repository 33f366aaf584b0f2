"""The HTTP the egress proxy speaks, sans-IO: find and parse a request head, write responses.

Two kinds of request: ``CONNECT host:port`` (a tunnel) and a plain request with an absolute
``http://`` URI, which is rewritten to origin form with ``Connection: close`` so that each guest
connection carries exactly one upstream exchange. Parsing is strict on purpose (CRLF only, no
header folding, ASCII only): the guest is untrusted and an ambiguous head is refused, not guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from node.allow_rules import normalize_host, split_host_port
from worker_role.egress_errors import BadProxyRequest, RequestHeadTooLarge

_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET_RE = re.compile(rb"[\x21-\x7e]+")
_VERSION_RE = re.compile(rb"HTTP/1\.[01]")
_FIELD_VALUE_RE = re.compile(rb"[\t\x20-\x7e]*")
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never passed upstream.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
    }
)
_REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """``CONNECT host:port``: open a tunnel."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """A plain request for ``http://host:port/...``; ``head`` is what to send upstream."""

    host: str
    port: int
    head: bytes


ProxyRequest = ConnectRequest | ForwardRequest


def find_head_end(buffer: bytes | bytearray, *, max_head: int) -> int | None:
    """The length of the complete head at the start of ``buffer`` (through the blank line), or
    None if more bytes are needed; :class:`RequestHeadTooLarge` once it cannot fit ``max_head``."""
    end = buffer.find(b"\r\n\r\n", 0, max_head)
    if end >= 0:
        return end + 4
    if len(buffer) >= max_head:
        raise RequestHeadTooLarge(f"request head is longer than {max_head} bytes")
    return None


def parse_request_head(head: bytes) -> ProxyRequest:
    """Parse one complete head (ending in the blank line); :class:`BadProxyRequest` if malformed."""
    if not head.endswith(b"\r\n\r\n"):
        raise BadProxyRequest("request head does not end with an empty line")
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise BadProxyRequest("bare CR or LF in the request head")
    method, target, version = _request_line(lines[0])
    headers = [_header(line) for line in lines[1:]]
    if method == b"CONNECT":
        host, port = _authority(target.decode("ascii"), default_port=None)
        return ConnectRequest(host, port)
    return _forward(method, target, version, headers)


def response(status: int, reason: str = "") -> bytes:
    """A complete response from the proxy itself; ``reason`` becomes a text/plain body."""
    line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
    if status == 200:
        return (line + "\r\n").encode("ascii")
    body = (reason + "\n").encode("utf-8") if reason else b""
    fields = (
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return (line + fields).encode("ascii") + body


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadProxyRequest("request line is not 'METHOD TARGET HTTP/1.x'")
    method, target, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise BadProxyRequest("bad method in the request line")
    if not _TARGET_RE.fullmatch(target):
        raise BadProxyRequest("bad target in the request line")
    if not _VERSION_RE.fullmatch(version):
        raise BadProxyRequest("only HTTP/1.0 and HTTP/1.1 are supported")
    return method, target, version


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN_RE.fullmatch(name):
        # Also refuses obs-fold (a line starting with whitespace): RFC 9112 5.2 lets a proxy refuse.
        raise BadProxyRequest("malformed header line")
    value = value.strip(b" \t")
    if not _FIELD_VALUE_RE.fullmatch(value):
        raise BadProxyRequest("control or non-ASCII character in a header value")
    return name, value


def _authority(text: str, *, default_port: int | None) -> tuple[str, int]:
    if "@" in text:
        raise BadProxyRequest("user info in the target is not supported")
    try:
        host, port = split_host_port(text, default_port=default_port)
        if port is None:
            raise ValueError("a port is required")
        return normalize_host(host), port
    except ValueError as exc:
        raise BadProxyRequest(f"bad target {text!r}: {exc}") from None


def _forward(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
) -> ForwardRequest:
    if not target[:7].lower() == b"http://":
        raise BadProxyRequest("a plain request needs an absolute http:// URI (use CONNECT for TLS)")
    rest = target[7:].decode("ascii")
    split = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:split], rest[split:].split("#", 1)[0]
    host, port = _authority(authority, default_port=80)
    if not path.startswith("/"):
        path = "/" + path
    named_in_connection = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    kept = [
        (name, value)
        for name, value in headers
        if name.lower() not in _HOP_BY_HOP and name.lower() not in named_in_connection
    ]
    host_field = host_header(host) + (b"" if port == 80 else b":%d" % port)
    lines = [b" ".join((method, path.encode("ascii"), version)), b"Host: " + host_field]
    lines += [name + b": " + value for name, value in kept]
    lines.append(b"Connection: close")
    return ForwardRequest(host, port, b"\r\n".join(lines) + b"\r\n\r\n")


def host_header(host: str) -> bytes:
    """``host`` as it appears in a Host field or an authority (IPv6 in brackets)."""
    return (f"[{host}]" if ":" in host else host).encode("ascii")
