"""What leaves the worker of a lease's output: its live output, streamed to the scheduler within
the live budget and rate (:class:`LiveLog`), and its result, published and signed."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import blake3
import trio

from catalog.dispatch import (
    LOGS,
    LOGS_PROTOCOL_ID,
    LOGS_WIRE_LIMITS,
    LeaseKey,
    LogChunk,
    ResultReport,
    signed_result_bytes,
)
from node.errors import NetworkError, ProtocolError
from node.identity import Identity
from node.p2p_stream import MessageStream
from node.wire import WireLimits
from worker_role.live_log import LiveLog
from worker_role.vm.interface import OutputChunk, VmResult

log = logging.getLogger("vmlend.worker.agent")


class StreamOpener(Protocol):
    async def open_stream(
        self, peer_id: str, protocol_id: str, *, limits: WireLimits | None = None
    ) -> MessageStream: ...


async def forward_logs(
    p2p: StreamOpener,
    scheduler: str,
    lease: LeaseKey,
    receive: trio.MemoryReceiveChannel[OutputChunk],
) -> None:
    """Stream a running lease's output to ``scheduler``; if it cannot take it, drain (the
    result has it)."""
    live = LiveLog(now=trio.current_time())
    async with receive:
        try:
            async with await p2p.open_stream(
                scheduler, LOGS_PROTOCOL_ID, limits=LOGS_WIRE_LIMITS
            ) as stream:
                async for kind, data in receive:
                    for part, bytes_ in live.admit(kind, data, trio.current_time()):
                        chunk = LogChunk(lease=lease, stream=part, data=bytes_)
                        await stream.send(LOGS.encode(chunk))
                for part, bytes_ in live.close():  # how much was dropped, if any
                    chunk = LogChunk(lease=lease, stream=part, data=bytes_)
                    await stream.send(LOGS.encode(chunk))
        except (NetworkError, ProtocolError) as e:
            log.info("log stream of %s: %s", lease, e)
            async for _ in receive:
                pass


async def signed_report(
    identity: Identity,
    publish: Callable[[bytes], Awaitable[bytes]],
    lease: LeaseKey,
    result: VmResult,
) -> ResultReport:
    """The result's outputs published as blobs (``publish`` gives each one's ID) and the report
    naming them, signed with the worker's key."""
    fields: dict[str, Any] = {
        "lease": lease,
        "exit_code": result.exit_code,
        "stdout_digest": blake3.blake3(result.stdout).digest(),
        "stderr_digest": blake3.blake3(result.stderr).digest(),
        "stdout_blob": await publish(result.stdout),
        "stderr_blob": await publish(result.stderr),
        "archive_blob": await publish(result.out_tar) if result.out_tar is not None else None,
    }
    signature = identity.sign(signed_result_bytes(**fields))
    return ResultReport(signature=signature, **fields)
