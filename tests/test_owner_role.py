"""The owner role's RPC surface: one list of its methods, refused with a clear word when off."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.errors import RpcError
from owner_role.service import OwnerService, resolve_task_id


def test_the_method_list_is_what_the_service_serves(tmp_path: Path) -> None:
    service = OwnerService.__new__(OwnerService)  # no node needed to list its methods
    served = {*service.rpc_methods(), *service.rpc_streams()}
    assert served == set(OwnerService.METHODS)


async def test_a_node_without_the_owner_role_says_how_to_turn_it_on() -> None:
    from node.daemon import _not_an_owner

    with pytest.raises(RpcError, match='add "owner" to roles'):
        await _not_an_owner([])


KNOWN = ("render-3fa9c01b2e", "render-3f00aa11bb", "backup-9c1e0d2a7f")


@pytest.mark.parametrize(
    ("given", "found"),
    [
        ("render-3fa9c01b2e", "render-3fa9c01b2e"),  # a whole ID
        ("render-3fa", "render-3fa9c01b2e"),  # the start of one
        ("9c1", "backup-9c1e0d2a7f"),  # the start of its random part, as docker shows IDs
        ("back", "backup-9c1e0d2a7f"),
        ("nothing-like-it", "nothing-like-it"),  # unknown: the caller says so
    ],
)
def test_a_task_is_named_by_its_id_or_the_start_of_one(given: str, found: str) -> None:
    assert resolve_task_id(given, KNOWN) == found


@pytest.mark.parametrize("given", ["render", "render-3f", "3f"])
def test_a_start_several_tasks_share_is_refused_naming_them(given: str) -> None:
    with pytest.raises(RpcError, match="starts 2 task IDs") as refused:
        resolve_task_id(given, KNOWN)
    assert refused.value.code == "ambiguous_task"
    assert "render-3f00aa11bb" in str(refused.value)
    assert "give more of it" in str(refused.value)
