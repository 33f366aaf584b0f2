"""Containing bugs: work a node starts for a peer must never end the node when it fails.

A service runs what it starts on a peer's behalf through :func:`run_contained`: an error the code
expects is handled where it happens; anything else is a bug (or a peer that drove the code
somewhere unforeseen), and it costs only that piece of work. It is logged with its traceback
under :data:`INTERNAL_ERROR`, and the test suite fails any test during which such a line was
logged, so containing a bug never hides it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from node.errors import VmlendError

INTERNAL_ERROR = "internal error"


def log_internal_error(log: logging.Logger, what: str, *args: object) -> None:
    """Log the exception being handled as a bug, with its traceback (call in an ``except``)."""
    log.exception(f"{INTERNAL_ERROR} in {what}", *args)


async def run_contained(
    log: logging.Logger, what: str, fn: Callable[[], Awaitable[object]]
) -> bool:
    """Run ``fn``; a bug in it is logged (see the module docstring) instead of raised.

    Returns whether it finished without one. Cancellation and KeyboardInterrupt pass through:
    they are not Exceptions."""
    try:
        await fn()
    except Exception:
        log_internal_error(log, what)
        return False
    return True


@asynccontextmanager
async def one_error() -> AsyncIterator[None]:
    """Let a nursery's error out as itself (trio groups even one), so callers can catch
    ``QuotaExceededError``, ``GuestTimeoutError`` & co. by their type.

    When several children failed at once (two providers unreachable together, say) and each
    failure is one of ours, the first is raised with a note naming the others: a caller that
    catches ``NetworkError`` must not see a group it cannot catch (it would end up logged as a
    bug). A group holding anything else (a bug, a cancellation) is left as it is."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 or all(isinstance(e, VmlendError) for e in leaves):
            first = leaves[0]
            if len(leaves) > 1:
                others = "; ".join(f"{type(e).__name__}: {e}"[:200] for e in leaves[1:4])
                first.add_note(f"and {len(leaves) - 1} more at the same time: {others}")
            raise first from first.__cause__  # keep its own cause, drop the group as context
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        else:
            leaves.append(error)
    return leaves


def lone_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception at the leaves of ``group`` (nested groups flattened), or None if there
    are several: a process that ends on one error reports that error, not trio's group."""
    leaves = _leaves(group)
    return leaves[0] if len(leaves) == 1 else None
