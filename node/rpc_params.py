"""Checking the params of local RPC calls: one place for the shapes every handler shares.

A handler's params are ``[positional..., {options}]``; what is wrong is answered with the stable
``invalid_params`` code and a message that names the option, never with an ``internal`` error.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from node.errors import RpcError
from node.rpc import INVALID_PARAMS


def options(
    params: list[Any], at: int, allowed: Collection[str], *, required: bool = False
) -> dict[str, Any]:
    """The options map at position ``at`` (absent means none, unless ``required``)."""
    if len(params) > at + 1 or (len(params) == at + 1 and not isinstance(params[at], dict)):
        raise RpcError(INVALID_PARAMS, f"expected at most one map of options {sorted(allowed)}")
    if required and len(params) != at + 1:
        raise RpcError(INVALID_PARAMS, f"expected a map of options {sorted(allowed)}")
    found: dict[str, Any] = params[at] if len(params) == at + 1 else {}
    if unknown := set(found) - set(allowed):
        raise RpcError(INVALID_PARAMS, f"unknown options {sorted(map(str, unknown))}")
    return found


def timeout_option(found: dict[str, Any], *, default: float, maximum: float) -> float:
    """Seconds in (0, ``maximum``]."""
    value = found.get("timeout", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum:
        raise RpcError(INVALID_PARAMS, f"timeout must be a number of seconds in (0, {maximum:g}]")
    return float(value)


def int_option(found: dict[str, Any], key: str, *, default: int, minimum: int = 0) -> int:
    value = found.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RpcError(INVALID_PARAMS, f"{key} must be a whole number >= {minimum}")
    return value
