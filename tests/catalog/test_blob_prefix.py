"""One ID-prefix rule (issue 18): a blob stored here is named by the start of its ID."""

from __future__ import annotations

import pytest

from catalog.blob import BlobId
from catalog.blob_rpc import blob_param_here, mapped_errors
from node.errors import RpcError

HERE = [BlobId(bytes.fromhex("3fa9" + "0" * 60)), BlobId(bytes.fromhex("3f00" + "1" * 60)),
        BlobId(bytes.fromhex("9c1e" + "2" * 60))]  # fmt: skip


async def here() -> list[BlobId]:
    return HERE


@pytest.mark.parametrize(
    ("given", "found"),
    [("3fa9", HERE[0]), ("3F00", HERE[1]), ("9c1e2222", HERE[2]), (HERE[0].hex(), HERE[0]),
     ("ab" * 32, BlobId(bytes.fromhex("ab" * 32)))],  # whole: named even if not here
)  # fmt: skip
async def test_a_blob_is_named_by_its_id_or_a_start_only_it_has(given: str, found: BlobId) -> None:
    assert await blob_param_here([given], here) == found


@pytest.mark.parametrize(
    ("given", "code", "words"),
    [("3f00" + "2" * 59, "not_found", "no blob here starts with"),
     ("3f0", "invalid_params", "not a blob ID"),  # too short to be a start
     ("zz12", "invalid_params", "not a blob ID")],
)  # fmt: skip
async def test_a_start_naming_none_or_too_short_is_refused(
    given: str, code: str, words: str
) -> None:
    with pytest.raises(RpcError) as refused, mapped_errors():  # as the RPC answers it
        await blob_param_here([given], here)
    assert refused.value.code == code
    assert words in refused.value.message


async def test_a_start_several_blobs_share_is_refused_naming_them() -> None:
    async def two() -> list[BlobId]:
        return [BlobId(bytes.fromhex("3fa9" + d * 60)) for d in "01"]

    with pytest.raises(RpcError) as refused:
        await blob_param_here(["3fa9"], two)
    assert refused.value.code == "ambiguous"
    shown = "'3fa9' starts 2 blob IDs here (3fa9000000000000, 3fa9111111111111): give more of it"
    assert refused.value.message == shown
