"""Signed records and content announcements in the DHT, as :class:`node.p2p.P2PNode` offers them.

A record is published under ``/vmlend/<kind>/<publisher peer ID>`` and announced in its kind's
index, so that anyone can list the publishers of a kind and no one can write another's record
(see :mod:`node.dht_records`). A content key is announced as provided by this node. Lookups ask
the network every time (see :mod:`node.p2p_dht`) and bound their time with deadlines; a listing
that cannot reach part of the network in time answers with what it knew, marked stale.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID

from node import dht_records
from node.dht_records import InvalidRecordError, Record, RecordNotFoundError
from node.errors import DeadlineError, LocalProtocolError
from node.heartbeat import Liveness
from node.identity import Identity
from node.p2p_dht import Dht
from node.p2p_host import parse_peer_id

logger = logging.getLogger("vmlend.node.p2p")

# Records remembered per kind for listings that cannot reach everyone (publishers choose how
# many exist: bounded, the soonest to expire forgotten first).
MAX_REMEMBERED = 1024


class DhtRecords:
    """One node's records and content announcements: ``dht`` is its DHT, ``peer_id`` and
    ``identity`` its own (records are signed with the identity), ``liveness`` its view of the
    live peers (asked first, and listed first), ``is_connected`` whether it holds a connection
    to a peer, and ``wall_clock`` the time signed into records."""

    def __init__(
        self,
        dht: Dht,
        identity: Identity,
        peer_id: str,
        *,
        liveness: Liveness,
        is_connected: Callable[[str], bool],
        wall_clock: Callable[[], float],
    ) -> None:
        self._dht = dht
        self.identity = identity
        self.peer_id = peer_id
        self._liveness = liveness
        self._is_connected = is_connected
        self._wall_clock = wall_clock
        self._remembered: dict[str, dict[str, Record]] = {}  # kind -> owner -> newest seen

    async def put_record(
        self, kind: str, name: str, payload: dict[str, Any], *, ttl: float
    ) -> Record:
        """Publish ``payload`` as this node's signed record of ``kind`` for ``ttl`` seconds, and
        announce it in the kind's index. ``name`` must be this node's peer ID: a record's key is
        ``/vmlend/<kind>/<publisher peer ID>`` so that no one else can write it. Republish before
        ``ttl`` runs out to keep it alive. Stores locally and at the k closest peers."""
        if name != self.peer_id:
            raise LocalProtocolError(
                f"a node publishes only under its own peer ID ({self.peer_id}), not {name!r}"
            )
        key, value = dht_records.make_record(
            self.identity, kind, payload, ttl=ttl, now=self._wall_clock()
        )
        await self._dht.put(key, value)
        await self._dht.provide(dht_records.index_key(kind))
        return dht_records.parse_record(key, value, now=self._wall_clock())

    async def get_record(
        self,
        kind: str,
        owner: str,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Record:
        """The newest valid record of ``kind`` published by peer ``owner``.

        The owner always holds its newest record, so when we are connected to it we ask it first
        (one stream); otherwise, or if it does not answer within a third of ``timeout``, we ask
        the k closest peers to the key (and the owner) through the DHT.
        Raises RecordNotFoundError (none, or only invalid copies) or DeadlineError."""
        key = dht_records.record_key(kind, owner)
        owner_id = parse_peer_id(owner)
        if owner == self.peer_id:
            mine = self.best_record(key, [v for v in [self._dht.get_local(key)] if v])
            if mine is not None:
                return mine
        try:
            with trio.fail_after(timeout):
                also_ask: ID | None = owner_id
                if self._is_connected(owner):
                    also_ask = None  # asked here already
                    with trio.move_on_after(timeout / 3):
                        value = await self._dht.get_from(owner_id, key)
                        direct = self.best_record(key, [value] if value else [])
                        if direct is not None:
                            return direct
                values = await self._dht.get_all(key, also_ask=also_ask)
        except trio.TooSlowError as e:
            raise DeadlineError(f"DHT lookup of {key} took over {timeout:g}s") from e
        best = self.best_record(key, values)
        if best is None:
            raise RecordNotFoundError(f"no valid record under {key}")
        return best

    def best_record(self, key: str, values: list[bytes]) -> Record | None:
        """The newest valid record among ``values`` found under ``key`` (invalid ones are
        logged and skipped), None if there is none."""
        best: Record | None = None
        now = self._wall_clock()
        for value in values:
            try:
                record = dht_records.parse_record(key, value, now=now)
            except InvalidRecordError as e:
                logger.info("invalid DHT record under %s: %s", key, e)
                continue
            if best is None or record.issued_at > best.issued_at:
                best = record
        return best

    async def find_records(
        self,
        kind: str,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> list[Record]:
        """Every valid record of ``kind`` whose publisher announced it in the kind's index
        (e.g. all schedulers), within ``timeout`` in all.

        Part of the network may be unreachable (a partition, a frozen peer): a publisher whose
        record could not be fetched in time, or every publisher when the index itself could not
        be read, is listed with the record this node last saw of it, if that is still unexpired,
        marked ``stale``. Raises DeadlineError only if the index lookup overran and this node
        knows no record of ``kind`` at all."""
        deadline = trio.current_time() + timeout
        owners: set[str] | None = None
        with trio.move_on_at(deadline):
            owners = {
                str(owner)
                for owner in await self._dht.providers(
                    dht_records.index_key(kind), also_ask=self._live_ids()
                )
            }
        fresh: dict[str, Record] = {}

        async def fetch(owner: str) -> None:
            left = deadline - trio.current_time()
            try:
                fresh[owner] = await self.get_record(kind, owner, timeout=max(left, 0.0))
            except (RecordNotFoundError, DeadlineError) as e:
                logger.debug("record %s of %s: %s", kind, owner, e)

        async with trio.open_nursery() as nursery:
            for owner in owners or ():
                nursery.start_soon(fetch, owner)
        for record in fresh.values():
            self._remember(record)
        known = self._known(kind)
        if owners is None and not known:
            raise DeadlineError(f"DHT index lookup of {kind!r} took over {timeout:g}s")
        if owners is None:
            logger.info(
                "listing %s: the index did not answer in time; listing what was known", kind
            )
        missed = (owners if owners is not None else set(known)) - set(fresh)
        stale = [dataclasses.replace(known[o], stale=True) for o in missed if o in known]
        return sorted([*fresh.values(), *stale], key=lambda r: r.owner)

    def _remember(self, record: Record) -> None:
        kept = self._remembered.setdefault(record.kind, {})
        old = kept.get(record.owner)
        if old is None or record.issued_at >= old.issued_at:
            kept[record.owner] = dataclasses.replace(record, stale=False)
        if len(kept) > MAX_REMEMBERED:
            del kept[min(kept, key=lambda owner: kept[owner].expires_at)]

    def _known(self, kind: str) -> dict[str, Record]:
        """Remembered records of ``kind`` that have not expired (expired ones forgotten)."""
        kept = self._remembered.get(kind, {})
        now = self._wall_clock()
        for owner in [o for o, r in kept.items() if r.expires_at <= now]:
            del kept[owner]
        return dict(kept)

    async def provide(self, key: bytes, *, timeout: float) -> None:  # noqa: ASYNC109
        """Announce in the DHT that this node holds ``key`` (a multihash; stored at the k closest
        peers, who keep it up to 48 h). Raises DeadlineError if announcing overran."""
        try:
            with trio.fail_after(timeout):
                await self._dht.provide(key.hex())
        except trio.TooSlowError as e:
            raise DeadlineError(f"DHT provide of {key.hex()} took over {timeout:g}s") from e

    def withdraw(self, key: bytes) -> None:
        """Stop announcing ``key``: dropped locally and never republished. Kademlia has no
        remove, so copies at other peers live until they expire; fetchers confirm with us."""
        self._dht.withdraw(key.hex())

    async def find_providers(
        self,
        key: bytes,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> list[str]:
        """Peer IDs (ourselves excluded) that announced ``key``, live ones first (those that
        answered a heartbeat within ``peer_timeout``). Raises DeadlineError on overrun."""
        try:
            with trio.fail_after(timeout):
                found = await self._dht.providers(key.hex(), also_ask=self._live_ids())
        except trio.TooSlowError as e:
            raise DeadlineError(f"DHT provider lookup of {key.hex()} took over {timeout:g}s") from e
        live = self._liveness.live
        found.discard(self.peer_id)
        return sorted(found, key=lambda p: (p not in live, p))

    def _live_ids(self) -> list[ID]:
        return [parse_peer_id(p) for p in sorted(self._liveness.live)]
