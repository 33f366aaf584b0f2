"""node.rpc_params: every malformed option is ``invalid_params``, never an internal error."""

from __future__ import annotations

from typing import Any

import pytest

from node import rpc_params
from node.errors import RpcError


def _code(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RpcError) as e:
        fn(*args, **kwargs)
    return e.value.code


def test_options_shapes() -> None:
    assert rpc_params.options([], 0, {"a"}) == {}
    assert rpc_params.options(["id", {"a": 1}], 1, {"a"}) == {"a": 1}
    assert _code(rpc_params.options, [{"b": 1}], 0, {"a"}) == "invalid_params"
    assert _code(rpc_params.options, ["x"], 0, {"a"}) == "invalid_params"
    assert _code(rpc_params.options, [{}, {}], 0, {"a"}) == "invalid_params"
    assert _code(rpc_params.options, [], 0, {"a"}, required=True) == "invalid_params"


@pytest.mark.parametrize("bad", ["x", 1.5, True, -1, None])
def test_int_option_refuses_anything_but_a_whole_number(bad: object) -> None:
    assert _code(rpc_params.int_option, {"count": bad}, "count", default=0) == "invalid_params"


@pytest.mark.parametrize("bad", ["30", 0, -1, 3601, True, float("nan")])
def test_timeout_option_bounds(bad: object) -> None:
    found = {"timeout": bad}
    assert _code(rpc_params.timeout_option, found, default=30, maximum=3600) == "invalid_params"


def test_defaults() -> None:
    assert rpc_params.int_option({}, "count", default=2) == 2
    assert rpc_params.timeout_option({}, default=30, maximum=3600) == 30.0
