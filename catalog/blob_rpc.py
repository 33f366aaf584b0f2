"""Argument checks, result shapes and error codes of the ``blob.*`` local RPC methods
(served by :class:`catalog.blob_service.BlobService`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from catalog.blob import BlobId, parse_blob_id
from catalog.chunking import ID_SIZE
from catalog.errors import (
    CatalogError,
    FetchTimeoutError,
    FileAccessError,
    InvalidIdError,
    NoProviderError,
    QuotaExceededError,
    TransferError,
    UnknownBlobError,
)
from catalog.transfer_plan import Progress
from node import rpc_params
from node.errors import NetworkError, RpcError


def progress_dict(p: Progress) -> dict[str, Any]:
    return {
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
        "bytes_fetched": p.bytes_fetched,
        "chunks_done": p.chunks_done,
        "chunks_total": p.chunks_total,
        "rate_bps": p.rate_bps,
        "peers": len([q for q in p.peers if q.status == "live"]),
    }


def blob_param(params: list[Any]) -> BlobId:
    if len(params) != 1 or not isinstance(params[0], str):
        raise RpcError("invalid_params", "expected [BLOB_ID]")
    return parse_blob_id(params[0])


MIN_PREFIX = 4  # hex digits: fewer would name most blobs of a large store


async def blob_param_here(params: list[Any], here: Callable[[], Awaitable[list[BlobId]]]) -> BlobId:
    """The blob ``params`` names: its whole ID, or the start of one (at least ``MIN_PREFIX`` hex
    digits) that only one blob ``here()`` lists has. A blob not stored here can be named only
    by its whole ID: nothing else says which one it is."""
    if len(params) != 1 or not isinstance(params[0], str):
        raise RpcError("invalid_params", "expected [BLOB_ID]")
    given = params[0].strip().lower()
    if len(given) == 2 * ID_SIZE or not (len(given) >= MIN_PREFIX and _is_hex(given)):
        return parse_blob_id(given)
    matches = [b for b in await here() if b.hex().startswith(given)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(b.hex()[:16] for b in matches[:4])
        raise RpcError(
            "ambiguous", f"{given!r} starts {len(matches)} blob IDs here ({shown}): give more of it"
        )
    raise RpcError(
        "not_found", f"no blob here starts with {given!r} (one held elsewhere needs its whole ID)"
    )


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def get_options(params: list[Any]) -> dict[str, Any]:
    options = rpc_params.options(params, 1, {"out", "from", "timeout", "channel"})
    out = options.get("out")
    if out is not None and (not isinstance(out, str) or not Path(out).is_absolute()):
        raise RpcError("invalid_params", "out must be an absolute path")
    sources = options.get("from", [])
    if not isinstance(sources, list) or not all(isinstance(a, str) for a in sources):
        raise RpcError("invalid_params", "from must be a list of multiaddrs")
    if not isinstance(options.get("channel", True), bool):
        raise RpcError("invalid_params", "channel must be true or false")
    rpc_params.timeout_option(options, default=3600, maximum=86400)
    return options


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Catalog and network failures as RPC errors with stable codes."""
    try:
        yield
    except FetchTimeoutError as e:
        raise RpcError("timeout", "blob transfer did not finish in time") from e
    except InvalidIdError as e:
        raise RpcError("invalid_params", str(e)) from e
    except UnknownBlobError as e:
        raise RpcError("not_found", str(e)) from e
    except QuotaExceededError as e:
        raise RpcError("quota_exceeded", str(e)) from e
    except FileAccessError as e:
        raise RpcError("file_access", str(e)) from e
    except NoProviderError as e:
        raise RpcError("no_provider", str(e)) from e
    except TransferError as e:
        raise RpcError("transfer_failed", str(e)) from e
    except CatalogError as e:
        raise RpcError("catalog_error", str(e)) from e
    except NetworkError as e:
        raise RpcError("network_error", str(e)) from e
