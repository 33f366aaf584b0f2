"""The owner role's RPC surface: one list of its methods, refused with a clear word when off."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.errors import RpcError
from owner_role.service import OwnerService


def test_the_method_list_is_what_the_service_serves(tmp_path: Path) -> None:
    service = OwnerService.__new__(OwnerService)  # no node needed to list its methods
    served = {*service.rpc_methods(), *service.rpc_streams()}
    assert served == set(OwnerService.METHODS)


async def test_a_node_without_the_owner_role_says_how_to_turn_it_on() -> None:
    from node.daemon import _not_an_owner

    with pytest.raises(RpcError, match='add "owner" to roles'):
        await _not_an_owner([])
