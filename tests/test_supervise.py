"""node.supervise.one_error: what a nursery's failure looks like to the caller."""

from __future__ import annotations

import pytest
import trio

from node.errors import NetworkError, PeerUnreachableError, StreamBrokenError
from node.supervise import lone_error, one_error


async def _fail(error: BaseException) -> None:
    raise error


async def _run(*errors: BaseException) -> None:
    async with one_error(), trio.open_nursery() as nursery:
        for error in errors:
            nursery.start_soon(_fail, error)


async def test_a_lone_error_comes_out_as_itself() -> None:
    with pytest.raises(PeerUnreachableError, match="gone"):
        await _run(PeerUnreachableError("gone"))


async def test_several_of_our_errors_at_once_come_out_as_the_first_with_a_note() -> None:
    """Two providers unreachable together escaped as a group no ``except NetworkError`` caught,
    and were logged as a bug in the scheduler's dispatch handler."""
    with pytest.raises(NetworkError) as caught:
        await _run(PeerUnreachableError("a"), StreamBrokenError("b"))
    assert any("1 more at the same time" in note for note in caught.value.__notes__)


async def test_a_group_holding_a_bug_stays_a_group() -> None:
    with pytest.raises(BaseExceptionGroup):
        await _run(PeerUnreachableError("a"), ValueError("a bug"))


def test_lone_error_flattens_nested_groups() -> None:
    inner = ExceptionGroup("inner", [ValueError("x")])
    assert isinstance(lone_error(ExceptionGroup("outer", [inner])), ValueError)
    assert lone_error(ExceptionGroup("two", [ValueError(), KeyError()])) is None
