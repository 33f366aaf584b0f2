"""``vmlend`` whose scheduler is killed (SIGKILL, by itself) at one step of accepting a submit.

Run as ``python crash_mid_submit_node.py node start ...`` in place of ``vmlend node start ...``
with ``VMLEND_TEST_CRASH_AT`` naming the step (one of :data:`STEPS`). It is the real command; only
the steps of :mod:`scheduler_role.owner_api` are wrapped, so production code has no fault hook.
The first submit that reaches the step ends the process there, as a power cut or the OOM killer
would.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import scheduler_role.owner_api as owner_api
import scheduler_role.task_store as task_store
from node.cli import main

STEPS = ("files", "unpacked", "stored", "settled", "enqueued", "answered")
BANNER = "fault: this scheduler dies at a step of its first submit: "


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        fn(*args, **kwargs)
        _die()

    return wrapped


def _after_async(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        await fn(*args, **kwargs)
        _die()

    return wrapped


def _after_a_submit_is_answered(serve: Callable[..., Any]) -> Callable[..., Any]:
    submitting = set()  # the OwnerApi serves one request per stream

    submit = owner_api.OwnerApi._submit

    async def noting_submit(self: Any, owner: str, request: Any) -> Any:
        submitting.add(id(self))
        return await submit(self, owner, request)

    owner_api.OwnerApi._submit = noting_submit  # type: ignore[method-assign]

    @functools.wraps(serve)
    async def wrapped(self: Any, stream: Any) -> None:
        await serve(self, stream)
        if id(self) in submitting:
            _die()

    return wrapped


def install(step: str) -> None:
    api = owner_api.OwnerApi
    if step == "files":
        api._fetch_files = _after_async(api._fetch_files)  # type: ignore[method-assign]
    elif step == "unpacked":
        owner_api.unpack_files = _after_sync(task_store.unpack_files)  # type: ignore[attr-defined]
    elif step == "stored":
        owner_api.store_task = _after_sync(task_store.store_task)  # type: ignore[attr-defined]
    elif step == "settled":
        owner_api.settle = _after_sync(task_store.settle)  # type: ignore[attr-defined]
    elif step == "enqueued":
        api._enqueue = _after_async(api._enqueue)  # type: ignore[method-assign]
    elif step == "answered":
        api.serve = _after_a_submit_is_answered(api.serve)  # type: ignore[method-assign]
    else:
        raise SystemExit(f"VMLEND_TEST_CRASH_AT must be one of {', '.join(STEPS)}")
    print(BANNER + step, flush=True)


if __name__ == "__main__":
    if step := os.environ.get("VMLEND_TEST_CRASH_AT"):
        install(step)
    sys.exit(main())
