"""The scheduler's side of ``/vmlend/dispatch/2.0.0``: one decoded request in, the answer out.

The p2p glue reads a frame, decodes it with :func:`catalog.dispatch.decode_request`, calls
:func:`handle` with the stream's authenticated peer ID, writes the answer back under the
request's ID, and pushes a :class:`catalog.dispatch.Stop` to every worker named in the returned
notices. Nothing here does I/O beyond the queue's own database.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import assert_never

from catalog.dispatch import (
    Answer,
    Heartbeat,
    HeartbeatAck,
    Lost,
    Request,
    ResultReport,
    Stop,
    WorkRequest,
    verify_report,
)
from node.errors import RemoteProtocolError
from scheduler_role.queue import Queue, StopNotice

log = logging.getLogger("vmlend.scheduler.dispatch")


def check_report(worker: str, report: ResultReport, public_key: bytes) -> None:
    """RemoteProtocolError unless ``report`` is signed by ``worker``'s key ``public_key``."""
    if not verify_report(report, public_key):
        log.warning("worker %s sent a result with a bad signature for %s", worker, report.lease)
        raise RemoteProtocolError(f"result for {report.lease} has a bad signature")


async def handle(
    queue: Queue,
    worker: str,
    message: Request,
    *,
    public_key: bytes,
    verified: bool = False,
    network: str | None = None,
    hold: float = 0.0,
    present: Callable[[], bool] = lambda: True,
) -> tuple[Answer, list[StopNotice]]:
    """Serve one request from ``worker`` (whose Ed25519 key is ``public_key``, seen on
    ``network``: :meth:`trust.Policy.network_of` of its connection's address).

    Returns the answer for this stream and the stop notices for any worker (the task this changed
    may be running elsewhere). :class:`RemoteProtocolError` for a result with a bad signature:
    drop the stream. ``verified`` says the caller has already checked a result's signature
    (:func:`check_report`), so it is not again. ``hold``: how long a work request may wait for
    work while ``present()`` (the caller bounds it; see :meth:`Queue.lease`).
    """
    if isinstance(message, WorkRequest):
        answer = await queue.lease(
            worker, message.offer, network=network, hold=hold, present=present
        )
        return answer, []
    if isinstance(message, Heartbeat):
        return await queue.heartbeat(worker, message), []
    if isinstance(message, ResultReport):
        if not verified:
            check_report(worker, message, public_key)
        return await queue.report(worker, message)
    if isinstance(message, Lost):
        stops = await queue.lost(worker, message.leases)
        return HeartbeatAck(stop=()), stops
    assert_never(message)


def stop_messages(notices: Iterable[StopNotice]) -> dict[str, list[Stop]]:
    """Group notices into one :class:`Stop` per worker and reason, to push."""
    grouped: dict[tuple[str, str], list[StopNotice]] = defaultdict(list)
    for notice in notices:
        grouped[(notice.worker, notice.reason)].append(notice)
    out: dict[str, list[Stop]] = defaultdict(list)
    for (worker, reason), group in sorted(grouped.items()):
        leases = tuple(sorted(n.lease for n in group))
        out[worker].append(Stop(leases=leases, reason=reason[:512]))
    return dict(out)
