"""The Sybil policy, sans-IO: networks from observed addresses, worker records, and a judge that
counts networks and earned trust rather than keys."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog.dispatch import LeaseKey
from scheduler_role.end_conditions import (
    Judgement,
    Outcome,
    ResultView,
    agreement_digest,
    judge,
)
from scheduler_role.lifecycle import Replica, ReplicaState, TaskState
from scheduler_role.trust import LAB, UNKNOWN_NETWORK, Conduct, Policy, WorkerRecord, replica_cap
from tests.scheduler.conftest import report, spec

POLICY = Policy()
FORGED = b"F" * 32
HONEST = b"H" * 32


@pytest.mark.parametrize(
    ("address", "network"),
    [
        (("203.0.113.7", 4001), "203.0.113.0/24"),
        (("203.0.113.250", 1), "203.0.113.0/24"),
        (("203.0.114.7", 4001), "203.0.114.0/24"),
        (("2001:db8:1:2::5", 4001), "2001:db8:1::/48"),
        (("2001:db8:1:ffff::9", 4001), "2001:db8:1::/48"),
        (("::ffff:198.51.100.9", 4001), "198.51.100.0/24"),  # an IPv4 peer on a dual stack
        (("fe80::1%eth0", 4001), "fe80::/48"),
        (("not an address", 1), UNKNOWN_NETWORK),
        (None, UNKNOWN_NETWORK),
    ],
)
def test_a_network_is_the_observed_address_cut_to_its_prefix(
    address: tuple[str, int] | None, network: str
) -> None:
    assert POLICY.network_of("12D3KooWpeer", address) == network


def test_prefixes_are_configurable_and_the_lab_makes_each_peer_its_own_network() -> None:
    narrow = Policy(ipv4_prefix=32, ipv6_prefix=64)
    assert narrow.network_of("p", ("203.0.113.7", 1)) == "203.0.113.7/32"
    assert narrow.network_of("p", ("2001:db8:1:2::5", 1)) == "2001:db8:1:2::/64"
    assert LAB.network_of("p1", ("127.0.0.1", 1)) != LAB.network_of("p2", ("127.0.0.1", 1))


def test_trust_is_earned_by_a_streak_and_lost_at_once() -> None:
    record = WorkerRecord()
    policy = Policy(trust_after=3)
    for _ in range(3):
        assert not policy.trusted(record)
        assert policy.max_leases(record, 64) == policy.untrusted_max_leases
        record = record.after(Conduct.AGREED)
    assert policy.trusted(record)
    assert policy.max_leases(record, 64) == 64
    for conduct in (Conduct.DISAGREED, Conduct.LOST, Conduct.EXPIRED):
        assert not policy.trusted(record.after(conduct))
    assert record.after(Conduct.DISAGREED) == WorkerRecord(agreed=3, disagreed=1, streak=0)
    assert record.after(Conduct.EXPIRED).expired == 1
    assert record.after(Conduct.LOST).lost == 1
    assert LAB.trusted(WorkerRecord())


def test_min_quorum_raises_quorum_and_replicas() -> None:
    raised = Policy(min_quorum=3).apply(spec(replicas=1, quorum=1))
    assert (raised.replicas, raised.quorum) == (3, 3)
    kept = Policy(min_quorum=2).apply(spec(replicas=5, quorum=4))
    assert (kept.replicas, kept.quorum) == (5, 4)


def test_agreement_covers_exit_code_stdout_stderr_and_the_archive() -> None:
    base = report(LeaseKey("t", 0, 1))
    same = agreement_digest(base)
    assert agreement_digest(report(LeaseKey("t", 1, 1))) == same  # the lease is not the result
    for changed in (
        replace(base, exit_code=1),
        replace(base, stdout_digest=b"x" * 32),
        replace(base, stderr_digest=b"x" * 32),
        replace(base, archive_blob=b"x" * 32),
    ):
        assert agreement_digest(changed) != same


def _replicas(n: int, reported: int) -> list[Replica]:
    return [
        Replica(i, ReplicaState.REPORTED if i < reported else ReplicaState.QUEUED) for i in range(n)
    ]


def _judge(
    results: list[ResultView], *, replicas: int, quorum: int = 1, rows: int = 0
) -> Judgement:
    """Judge an active task of ``replicas`` (``rows`` of them now, after any were added) whose
    first ``len(results)`` replicas have reported."""
    return judge(
        spec=spec(replicas=replicas, quorum=quorum),
        state=TaskState.ACTIVE,
        replicas=_replicas(max(rows, replicas), len(results)),
        results=results,
        held_for={},
        now_wall=0.0,
    )


def test_an_untrusted_result_alone_decides_nothing_and_asks_for_a_replica() -> None:
    j = _judge([ResultView(0, "a1", FORGED, "n1", False)], replicas=1)
    assert j.outcome is Outcome.RUNNING
    assert j.add == 1


def test_a_trusted_result_decides_a_quorum_of_one() -> None:
    j = _judge([ResultView(0, "h", HONEST, "n2", True)], replicas=1)
    assert (j.outcome, j.agreed) == (Outcome.SUCCEEDED, HONEST)


def test_two_untrusted_results_from_two_networks_agree() -> None:
    results = [ResultView(0, "a", HONEST, "n1", False), ResultView(1, "b", HONEST, "n2", False)]
    j = _judge(results, replicas=2)
    assert (j.outcome, j.agreed, j.agreeing) == (Outcome.SUCCEEDED, HONEST, ("a", "b"))


def test_results_from_one_network_count_once() -> None:
    results = [ResultView(i, f"a{i}", FORGED, "n1", False) for i in range(3)]
    j = _judge(results, replicas=3, quorum=2)
    assert j.outcome is Outcome.FAILED
    assert j.agreed is None


def test_a_trusted_worker_outvotes_an_untrusted_forger_that_came_first() -> None:
    results = [ResultView(0, "a", FORGED, "n1", False), ResultView(1, "h", HONEST, "n2", True)]
    j = _judge(results, replicas=2)
    assert (j.outcome, j.agreed, j.dissenters) == (Outcome.SUCCEEDED, HONEST, ("a",))


def test_confirmation_stops_at_the_replica_cap_and_fails_saying_why() -> None:
    task = spec(replicas=1)
    cap = replica_cap(task)
    results = [ResultView(i, f"w{i}", bytes([i]) * 32, f"n{i}", False) for i in range(cap)]
    j = _judge(results, replicas=1, rows=cap)
    assert j.outcome is Outcome.FAILED
    assert "another network" in j.reason


_result = st.builds(
    ResultView,
    replica=st.integers(0, 7),
    worker=st.sampled_from([f"w{i}" for i in range(8)]),
    digest=st.sampled_from([FORGED, HONEST, b"O" * 32]),
    network=st.sampled_from(["n1", "n2", "n3", ""]),
    trusted=st.booleans(),
)


@given(results=st.lists(_result, max_size=12), quorum=st.integers(1, 4))
def test_an_agreement_always_has_quorum_networks_and_trust_or_two_networks(
    results: list[ResultView], quorum: int
) -> None:
    replicas = max(quorum, len(results), 1)
    j = _judge(results, replicas=min(replicas, 16), quorum=min(quorum, 16))
    if j.agreed is None:
        return
    # Each worker and each network votes once, with its first result.
    workers: set[str] = set()
    networks: set[str] = set()
    backing = []
    for r in results:
        if r.worker not in workers and r.where not in networks:
            workers.add(r.worker)
            networks.add(r.where)
            if r.digest == j.agreed:
                backing.append(r)
    assert [r.worker for r in backing] == list(j.agreeing)
    assert len({r.where for r in backing}) == len(backing) >= quorum
    assert len(backing) >= 2 or any(r.trusted for r in backing)


@given(
    forgers=st.lists(st.sampled_from([f"a{i}" for i in range(5)]), min_size=1, max_size=10),
    quorum=st.integers(1, 3),
    honest_first=st.booleans(),
    honest_trusted=st.booleans(),
)
def test_any_number_of_identities_on_one_network_never_win_against_one_honest_worker(
    forgers: list[str], quorum: int, honest_first: bool, honest_trusted: bool
) -> None:
    forged = [ResultView(i, w, FORGED, "attacker/24", False) for i, w in enumerate(forgers)]
    honest = ResultView(len(forgers), "h", HONEST, "honest/24", honest_trusted)
    results = [honest, *forged] if honest_first else [*forged, honest]
    j = _judge(results, replicas=min(16, max(quorum, len(results))), quorum=quorum)
    assert j.agreed != FORGED
