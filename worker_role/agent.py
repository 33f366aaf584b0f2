"""The worker agent (DESIGN.md steps 2, 3, 5, 6, 9, 11): pulls work from schedulers, runs it in
capped VMs, reports signed results.

For each scheduler it finds (DHT records, plus ``worker.schedulers`` from the config) and its
lending policy serves, the agent keeps one ``/vmlend/dispatch/2.0.0`` control stream. One offer
loop asks for work only while the policy leaves room, one scheduler at a time, picked in proportion
to ``worker.shares`` (:mod:`worker_role.shares`) among those connected and not resting after a
``NoWork``. When only one scheduler can be asked, the request says it may wait there
(``WORK_WAIT``): the scheduler answers the moment work arrives instead of being asked every
second. The agent heartbeats every lease it holds (:func:`heartbeat_interval`), and obeys a pushed
:class:`Stop` (or a heartbeat ack's stop list) by cancelling the lease's scope, which destroys the
VM. A lease runs for the ``max_runtime`` its grant states, under the grant's caps. Images and
results go through :class:`LeaseBlobs`; output streams to the scheduler over
``/vmlend/tasklogs/1.0.0`` while the VM runs.

The agent is handed what it drives (the p2p node, the blobs, a :class:`BackendFactory`), so its
tests run it against fakes. Held leases are written to ``<data>/agent_leases.json``. After a crash
the VM backend sweeps the dead process's domains when it opens, and the agent tells each scheduler
which leases it lost.

No finished work is thrown away: a lease's signed result is written to the same file the moment
it exists, and kept (and heartbeated) until its scheduler acks it, whatever the scheduler says
meanwhile and across this process's restarts, for up to ``KEEP_RESULTS_FOR``. The scheduler
counts the result of a lease that lapsed meanwhile (:mod:`scheduler_role.queue_ops`).

While the backend cannot run VMs (its ``problem``: libvirtd unreachable, say) the agent asks for
no work, says why in :attr:`WorkerAgent.problem`, and tries the backend again every
``HEAL_INTERVAL``. A lease that fails names the step that failed (fetching its image, starting
its VM, while it ran, reporting).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import trio

from catalog.caps import Caps
from catalog.dispatch import (
    MAX_FETCHED,
    PROTOCOL_ID,
    WIRE_LIMITS,
    Heartbeat,
    HeartbeatAck,
    LeaseGrant,
    LeaseKey,
    Lost,
    NoWork,
    Offer,
    ResultAck,
    ResultReport,
    WorkRequest,
    lease_to_list,
)
from catalog.errors import CatalogError
from catalog.scheduler_choice import SchedulerChoice, choice_key
from catalog.scheduler_record import SchedulerDirectory
from node.config import WorkerConfig
from node.dht_records import Record
from node.durable import read_state, write_atomically
from node.errors import (
    NetworkError,
    ProtocolError,
    RemoteProtocolError,
    StoreError,
)
from node.identity import Identity
from node.p2p_keepalive import DialBackoff
from node.p2p_stream import MessageStream
from node.wire import WireLimits
from worker_role.agent_state import State, parse_state, report_to_hex
from worker_role.control_stream import REQUEST_TIMEOUT, ControlStream, heartbeat_interval
from worker_role.errors import VmError, WorkerError
from worker_role.lease_blobs import LeaseBlobs
from worker_role.lease_output import signed_report
from worker_role.lease_vm import Lease, LeaseHooks, run_vm
from worker_role.policy import LendingPolicy, PolicyError
from worker_role.shares import Shares
from worker_role.vm.interface import Backend, BackendFactory, VmResult
from worker_role.vm.task import GuestCommand

log = logging.getLogger("vmlend.worker.agent")

SCHEDULER_RECORD_KIND = "scheduler"
DISCOVERY_INTERVAL = 5.0
# How long a finished result is kept for a scheduler that does not take it (from each start).
KEEP_RESULTS_FOR = 24 * 3600.0
MAX_UNDELIVERED = 16  # results a scheduler may leave untaken before it is asked for no more work
HEAL_INTERVAL = 5.0  # while the backend cannot run VMs, how often it is tried again
# The least a NoWork's retry_after rests a scheduler: a tiny one must not make us ask in a loop.
RETRY_FLOOR = 1.0
# How long a work request may wait at the scheduler for work, when no other scheduler could be
# asked meanwhile (the scheduler answers the moment work arrives; it holds at most MAX_WORK_HOLD).
WORK_WAIT = 10.0
STATE_FILE = "agent_leases.json"
RESERVE_FOR = 60.0  # redialling a scheduler whose stream broke; then it is left to discovery
RESERVE_STABLE = 10.0  # a stream that lasted this long resets the pauses


class SchedulerNetwork(Protocol):
    """What the agent needs of the p2p node (:class:`node.p2p.P2PNode` is one)."""

    async def find_records(self, kind: str, *, timeout: float) -> list[Record]: ...  # noqa: ASYNC109

    def is_connected(self, peer_id: str) -> bool: ...

    async def connect(self, addr: str) -> str: ...

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, limits: WireLimits | None = None
    ) -> MessageStream: ...


class WorkerAgent:
    def __init__(
        self,
        p2p: SchedulerNetwork,
        blobs: LeaseBlobs,
        identity: Identity,
        data_dir: Path,
        config: WorkerConfig,
        *,
        open_backend: BackendFactory,
    ) -> None:
        """``open_backend`` opens the VM backend when :meth:`run` starts."""
        self.p2p = p2p
        self.blobs = blobs
        self.identity = identity
        self.config = config
        self.policy = LendingPolicy.of(config)
        self._state_path = data_dir / STATE_FILE
        self._open_backend = open_backend
        # By scheduler and key: a key is the scheduler's word, and another scheduler may name
        # the same one (by chance or to take over this lease's heartbeats, stop and result).
        self._leases: dict[tuple[str, LeaseKey], Lease] = {}
        self._lost: dict[str, list[LeaseKey]] = {}
        self._controls: dict[str, ControlStream] = {}
        self._addrs: dict[str, list[str]] = {}
        self._serving: set[str] = set()
        self._redial = DialBackoff()  # pauses between dials of a scheduler whose stream broke
        self._shares = Shares(dict(config.shares))
        self._resting: dict[str, float] = {}  # scheduler -> when it may be asked again (NoWork)
        self._controls_changed = trio.Event()
        # Leases, room or controls changed: the offer loop and the heartbeats look again.
        self._poked = trio.Event()
        self.backend: Backend
        self.problem: str | None = None  # why this node cannot lend, if it cannot

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lend until cancelled. If this machine cannot run VMs (no tiny OS, no libvirt, ...)
        the node keeps running without lending, and :attr:`problem` says why."""
        state = await trio.to_thread.run_sync(self._load_state)
        self._lost = state.lost
        async with AsyncExitStack() as stack:
            try:
                self.backend = await stack.enter_async_context(
                    self._open_backend(runtime_dir=self.config.vm_dir, policy=self.policy)
                )
            except WorkerError as e:
                self.problem = str(e)
                log.error("not lending: %s (run 'vmlend doctor')", e)
                task_status.started()
                return
            nursery = await stack.enter_async_context(trio.open_nursery())
            for scheduler, kept in state.kept.items():
                for report, timeout in kept:
                    self._leases[scheduler, report.lease] = Lease(
                        None, timeout, running=True, report=report
                    )
                    nursery.start_soon(self._deliver_kept, scheduler, report)
            nursery.start_soon(self._discover, nursery)
            nursery.start_soon(self._offer_loop, nursery)
            task_status.started()

    # ---- state ---------------------------------------------------------------------------

    def _load_state(self) -> State:
        # A torn or damaged file is set aside: the node starts, and those leases lapse at
        # their schedulers as every lease of a silent worker does.
        return read_state(self._state_path, parse_state) or State({}, {})

    def _save_state(self) -> None:
        held: dict[str, list[Any]] = {}
        kept: dict[str, list[Any]] = {}
        for (scheduler, key), lease in self._leases.items():
            if lease.report is None:
                held.setdefault(scheduler, []).append(lease_to_list(key))
            else:
                entry = {"report": report_to_hex(lease.report), "timeout": lease.lease_timeout}
                kept.setdefault(scheduler, []).append(entry)
        for scheduler, keys in self._lost.items():
            held.setdefault(scheduler, []).extend(lease_to_list(k) for k in keys)
        state = {"leases": held, "results": kept}
        write_atomically(self._state_path, json.dumps(state).encode())

    async def _save_state_quietly(self) -> None:
        """Save the lease file where failing to is no lease's fault (a lease that ended, leases
        reported lost): a full disk is said, and the next save writes it all."""
        try:
            await trio.to_thread.run_sync(self._save_state)
        except OSError as e:
            log.warning("cannot write %s: %s", self._state_path, e.strerror or e)

    def _room_changed(self) -> None:
        self._resting.clear()  # with new room, every scheduler may have work for us again
        self._poke()

    def _poke(self) -> None:
        self._poked.set()
        self._poked = trio.Event()

    # ---- schedulers ----------------------------------------------------------------------

    # network.trusted_schedulers (the daemon sets it): asked for work first; while one of them
    # is served, no untrusted scheduler is taken on (catalog.scheduler_choice).
    trusted_schedulers: frozenset[str] = frozenset()

    async def _discover(self, nursery: trio.Nursery) -> None:
        directory = SchedulerDirectory(self.p2p)
        choice = SchedulerChoice(choice_key(self.identity.private_bytes), self.trusted_schedulers)
        while True:
            found: dict[str, list[str]] = {s: [] for s in self.config.schedulers}
            try:
                for advert in await directory.find(timeout=10.0):
                    found[advert.peer_id] = list(advert.addrs)
            except NetworkError as e:
                log.info("finding schedulers: %s", e)
            trusted, untrusted = choice.split(s for s in found if self.policy.serves(s))
            for scheduler in trusted:
                if scheduler not in self._serving:
                    self._serving.add(scheduler)
                    nursery.start_soon(self._serve_guarded, scheduler, found[scheduler])
            # Until a trusted one is served or all of them failed (bounded: one may hang).
            with trio.move_on_after(2 * DISCOVERY_INTERVAL):
                while not any(s in self._controls for s in trusted) and any(
                    s in self._serving for s in trusted
                ):
                    await self._controls_changed.wait()
            if not any(s in self._controls for s in choice.trusted):
                for scheduler in untrusted:
                    if scheduler not in self._serving:
                        self._serving.add(scheduler)
                        nursery.start_soon(self._serve_guarded, scheduler, found[scheduler])
            await trio.sleep(DISCOVERY_INTERVAL)

    async def _serve_guarded(self, scheduler: str, addrs: list[str]) -> None:
        """Serve ``scheduler``; when its stream breaks (it restarted, we were frozen, a partition
        healed), dial it again at once and then with the p2p layer's growing, jittered pauses,
        rather than wait for the next DHT round (up to 15 s): what is known of it is still its
        best address. Given up after :data:`RESERVE_FOR` s without a stream that lasted; discovery
        finds it again."""
        failing_since: float | None = None
        try:
            while True:
                error: object = "its stream ended"
                began = trio.current_time()
                try:
                    await self._serve(scheduler, addrs)
                except* (NetworkError, ProtocolError, trio.TooSlowError) as group:
                    error = _first(group)
                finally:
                    served = scheduler in self._controls
                    self._controls.pop(scheduler, None)
                    self._resting.pop(scheduler, None)
                    self._control_changed()
                now = trio.current_time()
                # A stream that worked for a while is a fresh start; one that keeps being dropped
                # as soon as it is open is a failure like any other (no dialling in a loop).
                if failing_since is None or (served and now - began >= RESERVE_STABLE):
                    failing_since = now
                    self._redial.reached(scheduler)
                if now - failing_since >= RESERVE_FOR:
                    log.info("scheduler %s: %s (will look again)", scheduler, error)
                    return
                pause = self._redial.failed(scheduler, now)
                log.info("scheduler %s: %s (again in %.2g s)", scheduler, error, pause)
                await trio.sleep(pause)
        finally:
            self._redial.reached(scheduler)
            self._serving.discard(scheduler)
            self._control_changed()

    async def _serve(self, scheduler: str, addrs: list[str]) -> None:
        if addrs and not self.p2p.is_connected(scheduler):
            await self.p2p.connect(addrs[0])
        async with (
            await self.p2p.open_stream(scheduler, PROTOCOL_ID, limits=WIRE_LIMITS) as stream,
            trio.open_nursery() as nursery,
        ):
            stream.deadline = math.inf  # reads wait for pushes; requests have their own deadline
            control = ControlStream(stream)
            nursery.start_soon(control.read, functools.partial(self._stop, scheduler))
            if lost := self._lost.get(scheduler):
                await control.request(Lost(leases=tuple(lost)))
                del self._lost[scheduler]
                await self._save_state_quietly()
            self._controls[scheduler] = control
            self._addrs[scheduler] = addrs
            self._control_changed()
            nursery.start_soon(self._heartbeats, scheduler, control)
            await control.wait_failed()

    async def _offer_loop(self, nursery: trio.Nursery) -> None:
        """While the policy leaves room, ask one scheduler at a time for work, by their shares.

        One offer out at a time across schedulers: the room offered is then really free.
        """
        while True:
            poked = self._poked  # taken before looking, so no change is missed
            if self.backend.problem is not None:
                await self._heal(poked)
                continue
            now = trio.current_time()
            self._resting = {s: t for s, t in self._resting.items() if t > now}
            room = self.policy.remaining(self._taken())
            capacity = self.policy.remaining([])
            if room is None or capacity is None:
                await poked.wait()
                continue
            waiting = self._owed()
            ready = [
                s
                for s, c in self._controls.items()
                if not c.broken and s not in self._resting and s not in waiting
            ]
            scheduler = self._shares.pick(ready)
            if scheduler is None:
                with trio.move_on_at(min(self._resting.values(), default=math.inf)):
                    await poked.wait()
                continue
            offer = Offer(room=room, capacity=capacity, images=self.blobs.images)
            wait = self._wait_for(ready)
            await self._offer(scheduler, self._controls[scheduler], offer, wait, nursery)

    def _wait_for(self, ready: list[str]) -> float | None:
        """How long the next work request may wait at its scheduler: while it waits, no other
        scheduler is asked, so only when it is the one ready, and not past the end of another's
        rest."""
        if len(ready) != 1:
            return None
        wait = min(WORK_WAIT, min(self._resting.values(), default=math.inf) - trio.current_time())
        return wait if wait >= RETRY_FLOOR else None

    def _owed(self) -> set[str]:
        """Schedulers not to ask for work until they take results we keep for them: one with
        results kept from before our restart (it might lease their lapsed replicas back to us
        before it hears they are done), and one that leaves ``MAX_UNDELIVERED`` untaken (a
        scheduler that never acks must not make us keep results without end)."""
        owed: dict[str, int] = {}
        restored: set[str] = set()
        for (scheduler, _), lease in self._leases.items():
            if lease.report is not None or lease.finished:
                owed[scheduler] = owed.get(scheduler, 0) + 1
                if lease.caps is None:
                    restored.add(scheduler)
        return restored | {s for s, n in owed.items() if n >= MAX_UNDELIVERED}

    def _taken(self) -> list[Caps]:
        """The caps of every lease whose VM is starting, running or being torn down."""
        return [v.caps for v in self._leases.values() if not v.vm_gone and v.caps is not None]

    async def _heal(self, poked: trio.Event) -> None:
        """The backend cannot run VMs: ask for no work, say why, and try it again now and then."""
        problem = self.backend.problem
        if problem != self.problem:
            self.problem = problem
            log.warning("not asking for work: %s", problem)
        with trio.move_on_after(HEAL_INTERVAL):
            await poked.wait()
        await self.backend.heal()
        if self.backend.problem is None:
            log.warning("VMs can run again: asking for work")
            self.problem = None
            self._room_changed()

    async def _offer(
        self,
        scheduler: str,
        control: ControlStream,
        offer: Offer,
        wait: float | None,
        nursery: trio.Nursery,
    ) -> None:
        asked = trio.current_time()
        try:
            answer = await control.request(WorkRequest(offer=offer, wait=wait))
        except (NetworkError, ProtocolError, trio.TooSlowError) as e:
            control.fail(e)  # the task serving this scheduler raises it and lets go of it
            return
        if isinstance(answer, LeaseGrant):
            held = (scheduler, answer.lease)
            if held in self._leases:
                # Two runs of one lease would share its heartbeats, stop and result: the repeat
                # breaks the protocol, and the stream it came on goes (the lease held runs on).
                log.warning("scheduler %s granted %s again while it runs here", *held)
                control.fail(RemoteProtocolError(f"{scheduler} granted {answer.lease} twice"))
                return
            self._leases[held] = Lease(answer.caps, answer.lease_timeout)
            log.info("lease %s granted by %s", answer.lease, scheduler)
            self._poke()
            nursery.start_soon(self._run_lease, scheduler, self._addrs[scheduler], answer)
        elif isinstance(answer, NoWork):
            now = trio.current_time()
            if wait is not None and now - asked >= wait / 2:
                return  # it held the request while there was no work: ask again at once
            self._resting[scheduler] = now + max(RETRY_FLOOR, answer.retry_after)
        else:
            control.fail(ProtocolError(f"{scheduler} answered a work request with {answer.TYPE}"))

    async def _heartbeats(self, scheduler: str, control: ControlStream) -> None:
        """Heartbeat the leases held for ``scheduler`` every :func:`heartbeat_interval` of their
        timeouts, and at once when one of them starts running (the scheduler counts a replica's
        max runtime from its VM's start, which it learns from a heartbeat)."""
        last = -math.inf
        told_running: set[LeaseKey] = set()
        while True:
            poked = self._poked  # taken before looking, so no change is missed
            mine = {k: v for (s, k), v in self._leases.items() if s == scheduler}
            running = tuple(k for k, v in mine.items() if v.running)
            interval = heartbeat_interval(v.lease_timeout for v in mine.values())
            if interval is None:
                await poked.wait()
                continue
            if trio.current_time() < last + interval and told_running.issuperset(running):
                with trio.move_on_at(last + interval):
                    await poked.wait()
                continue
            last = trio.current_time()
            fetched = tuple(v.fetched for v in mine.values())
            beat = Heartbeat(leases=tuple(mine), running=running, fetched=fetched)
            answer = await control.request(beat)
            told_running = set(running)
            if isinstance(answer, HeartbeatAck) and answer.stop:
                self._stop(scheduler, answer.stop, "no longer ours")

    def _stop(self, scheduler: str, leases: tuple[LeaseKey, ...], reason: str) -> None:
        """Stop those of ``leases`` that ``scheduler`` granted: a scheduler's word changes only
        its own leases."""
        for key in leases:
            lease = self._leases.get((scheduler, key))
            if lease is None:
                continue
            if lease.report is not None:
                # Its VM is gone and its result is here: the scheduler decides what it is worth.
                log.debug("%s stopped (%s) after it finished: its result goes anyway", key, reason)
                continue
            log.info("stopping %s: %s", key, reason)
            lease.scope.cancel()

    # ---- one lease -----------------------------------------------------------------------

    async def _run_lease(self, scheduler: str, addrs: list[str], grant: LeaseGrant) -> None:
        lease = self._leases[scheduler, grant.lease]
        try:
            # The VM is torn down in here while its result is reported (they overlap); the
            # lease is let go once both are over, so its room is counted until the VM is gone.
            async with trio.open_nursery() as teardown:
                report = await self._produce(scheduler, addrs, grant, lease, teardown)
                if report is not None:
                    lease.report = report
                    await self._save_state_quietly()  # kept across a restart from here on
                    await self._deliver(scheduler, report)
        finally:
            del self._leases[scheduler, grant.lease]
            await self._save_state_quietly()
            self._room_changed()

    async def _produce(
        self,
        scheduler: str,
        addrs: list[str],
        grant: LeaseGrant,
        lease: Lease,
        teardown: trio.Nursery,
    ) -> ResultReport | None:
        """Run the lease to its signed result; None if it was stopped, or failed (then its
        scheduler is told it is lost, and the step that failed is logged)."""
        try:
            with lease.scope:
                # Held only once remembered: after a crash its scheduler must hear it was lost.
                await trio.to_thread.run_sync(self._save_state)
                result = await self._execute(scheduler, addrs, grant, lease, teardown)
                lease.step = "reporting its result"
                return await signed_report(self.identity, self.blobs.publish, grant.lease, result)
        except* (
            VmError,
            CatalogError,
            PolicyError,
            NetworkError,
            ProtocolError,
            ValueError,
            OSError,  # the disk's fault (a full one, say): it costs this lease
            StoreError,  # and so is a database that cannot be written
            trio.TooSlowError,
        ) as e:
            log.warning("lease %s failed %s: %s", grant.lease, lease.step, _first(e))
            if isinstance(_first(e), VmError):
                await self.backend.heal()  # libvirtd gone? then no more work until it is back
            control = self._controls.get(scheduler)
            if control is not None:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    try:
                        await control.request(Lost(leases=(grant.lease,)))
                    except (NetworkError, ProtocolError) as e2:
                        log.info("telling %s about lost %s: %s", scheduler, grant.lease, e2)
        return None

    async def _deliver_kept(self, scheduler: str, report: ResultReport) -> None:
        """Deliver a result kept from before a restart, then forget it."""
        try:
            await self._deliver(scheduler, report)
        finally:
            del self._leases[scheduler, report.lease]
            self._poke()
            await self._save_state_quietly()

    async def _deliver(self, scheduler: str, report: ResultReport) -> None:
        """Hand the result to the scheduler, across its restarts and ours: until it acks it
        (any status: a second copy is acked DUPLICATE, one it cannot use STALE), for at most
        ``KEEP_RESULTS_FOR``."""
        with trio.move_on_after(KEEP_RESULTS_FOR) as kept:
            while True:
                changed = self._controls_changed
                control = self._controls.get(scheduler)
                if control is None or control.broken:
                    await changed.wait()
                    continue
                try:
                    answer = await control.request(report)
                except (NetworkError, ProtocolError, trio.TooSlowError) as e:
                    log.info("result of %s not delivered yet: %s", report.lease, e)
                    control.fail(e)
                    await changed.wait()
                    continue
                if isinstance(answer, ResultAck) and answer.lease == report.lease:
                    log.info("result of %s: %s", report.lease, answer.status.value)
                    return
                control.fail(
                    RemoteProtocolError(f"{scheduler} answered a result with {answer.TYPE}")
                )
                await changed.wait()
        if kept.cancelled_caught:
            log.warning("result of %s: %s never took it; dropped", report.lease, scheduler)

    def _control_changed(self) -> None:
        self._controls_changed.set()
        self._controls_changed = trio.Event()
        self._poke()

    async def _execute(
        self,
        scheduler: str,
        addrs: list[str],
        grant: LeaseGrant,
        lease: Lease,
        teardown: trio.Nursery,
    ) -> VmResult:
        """The VM's result, as soon as the guest has given it: the VM is then torn down in
        ``teardown`` while the caller reports the result."""

        def fetched(n: int) -> None:
            lease.fetched = min(n, MAX_FETCHED)

        image, m = await self.blobs.image(grant, addrs, fetched)
        log.info("lease %s image ready", grant.lease)
        lease.step = "starting its VM"
        # The grant is the one word on how long this replica may run: the scheduler stops it
        # there too. (The manifest's timeout_s is what a local `vmlend vm run` defaults to.)
        timeout = max(1, math.ceil(grant.max_runtime))
        task = GuestCommand(argv=m.command, env=dict(m.env), cwd=m.cwd, timeout_s=timeout)
        result: VmResult = await teardown.start(
            run_vm, self.backend, self.p2p, scheduler, grant, image, task, lease,
            LeaseHooks(poke=self._poke, room_changed=self._room_changed),
        )  # fmt: skip
        return result


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf of ``group``, for one log line."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
