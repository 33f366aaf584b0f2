"""The catalog's local RPC methods, for the daemon to serve (see ``node.rpc_server``).

Methods (params are MessagePack-RPC arrays; results are maps as :meth:`Entry.to_dict` gives)::

    catalog.list    [] | [{"kind": K}]                  -> [entry, ...]
    catalog.show    [REF] | [REF, {"kind": K}]          -> entry        (REF: ID, ID prefix,
                                                                         NAME or NAME@VERSION)
    catalog.publish [{"entry": bytes}]                  -> {"id", "new", "entry"}
                    [{"kind", "name", "version", "blobs", "meta"?}]   (signed with the node's key)
    catalog.wait    [ID] | [ID, {"timeout": s}]         -> entry, once ID is in the catalog
                                                           (e.g. replicated); default 30 s

Errors are :class:`RpcError` with codes ``invalid_params``, ``invalid_entry``,
``forged_entry`` (the signature does not verify), ``untrusted_publisher`` (the message gives
the reason), ``not_found``, ``ambiguous`` and ``timeout``.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from catalog.entries import KINDS, Entry, TrustPolicy, decode_entry, make_entry
from catalog.errors import (
    AmbiguousEntryError,
    EntrySignatureError,
    InvalidEntryError,
    UnknownEntryError,
    UntrustedPublisherError,
)
from catalog.library import Library
from node import rpc_params
from node.errors import RpcError
from node.identity import Identity

Handler = Callable[[list[Any]], Awaitable[Any]]

_FIELDS = {"kind", "name", "version", "blobs", "meta"}
_ID_RE = re.compile(r"[0-9a-f]{64}")


class CatalogService:
    """The RPC face of a :class:`Library`; ``identity`` signs entries published by fields."""

    def __init__(
        self,
        library: Library,
        identity: Identity,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.library = library
        self.identity = identity
        self._wall_clock = wall_clock

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {
            "catalog.list": self._list,
            "catalog.show": self._show,
            "catalog.publish": self._publish,
            "catalog.wait": self._wait,
        }

    async def _list(self, params: list[Any]) -> list[dict[str, Any]]:
        options = rpc_params.options(params, 0, {"kind"})
        kind = _kind(options)
        return [e.to_dict() for e in await self.library.list_entries(kind)]

    async def _show(self, params: list[Any]) -> dict[str, Any]:
        if not params or not isinstance(params[0], str):
            raise RpcError("invalid_params", "expected [REF] or [REF, {kind}]")
        options = rpc_params.options(params, 1, {"kind"})
        with _mapped_errors():
            entry = await self.library.resolve(params[0], _kind(options))
        return entry.to_dict()

    async def _publish(self, params: list[Any]) -> dict[str, Any]:
        if len(params) != 1 or not isinstance(params[0], dict):
            raise RpcError("invalid_params", "expected one map: {entry} or the entry's fields")
        request: dict[str, Any] = params[0]
        with _mapped_errors():
            entry = self._entry_from(request)
            new = await self.library.insert(entry)
        return {"id": entry.id, "new": new, "entry": entry.to_dict()}

    async def _wait(self, params: list[Any]) -> dict[str, Any]:
        if not params or not isinstance(params[0], str) or not _ID_RE.fullmatch(params[0]):
            raise RpcError("invalid_params", "expected [ID] or [ID, {timeout}] with a full ID")
        timeout = rpc_params.timeout_option(
            rpc_params.options(params, 1, {"timeout"}), default=30, maximum=3600
        )
        with trio.move_on_after(timeout):
            await self.library.wait_for(params[0])
            return (await self.library.get(params[0])).to_dict()
        raise RpcError("timeout", f"entry {params[0]} not in the catalog after {timeout:g}s")

    def _entry_from(self, request: dict[str, Any]) -> Entry:
        if set(request) == {"entry"}:
            if not isinstance(request["entry"], bytes):
                raise RpcError("invalid_params", "entry must be the signed entry's bytes")
            return decode_entry(request["entry"])
        if unknown := set(request) - _FIELDS:
            raise RpcError("invalid_params", f"unknown fields {sorted(map(str, unknown))}")
        if missing := (_FIELDS - {"meta"}) - set(request):
            raise RpcError("invalid_params", f"missing fields {sorted(missing)}")
        if not isinstance(request["blobs"], dict) or not isinstance(request.get("meta", {}), dict):
            raise RpcError("invalid_params", "blobs and meta must be maps")
        return make_entry(
            self.identity,
            kind=request["kind"],
            name=request["name"],
            version=request["version"],
            blobs=request["blobs"],
            meta=request.get("meta", {}),
            now=self._wall_clock(),
        )


@asynccontextmanager
async def open_catalog(
    data_dir: Path,
    identity: Identity,
    trusted: Iterable[bytes],
    *,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[CatalogService]:
    """Open ``<data_dir>/catalog.db`` for a node: its library trusts ``trusted`` (the config's
    ``catalog.trusted_publisher_keys``) and the node's own key, so that what ``catalog.publish``
    signs here is kept here; other schedulers accept it only if their config trusts this key."""
    policy = TrustPolicy({*trusted, identity.public_bytes})
    async with Library.open(data_dir, policy) as library:
        yield CatalogService(library, identity, wall_clock=wall_clock)


def _kind(options: dict[str, Any]) -> str | None:
    kind = options.get("kind")
    if kind is not None and kind not in KINDS:
        raise RpcError("invalid_params", f"kind must be one of {', '.join(KINDS)}")
    return kind


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except EntrySignatureError as e:  # before its base class InvalidEntryError
        raise RpcError("forged_entry", str(e)) from e
    except InvalidEntryError as e:
        raise RpcError("invalid_entry", str(e)) from e
    except UntrustedPublisherError as e:
        raise RpcError("untrusted_publisher", str(e)) from e
    except UnknownEntryError as e:
        raise RpcError("not_found", str(e)) from e
    except AmbiguousEntryError as e:
        raise RpcError("ambiguous", str(e)) from e
