"""The lab itself, without vmlend nodes: reachability through NAT, delay, loss, rate, teardown.

One lab is built for the module (about a second); each test checks one property of it with
real kernel sockets opened inside its namespaces.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netlab import probe
from tests.netlab.lab import Lab, namespaces
from tests.netlab.netns import socket_in
from tests.netlab.topology import HomeSpec, HostSpec, LinkSpec, Topology, TopologyError, plan

DELAY_MS = 20.0  # home a's uplink, each way: a round trip from home a to public adds 40 ms
LOSS = 0.10  # home b's uplink, each way
RATE_MBIT = 8.0  # public host "slow"

TOPOLOGY = Topology(
    "fast-checks",
    public=(HostSpec("sched"), HostSpec("relay"), HostSpec("slow", LinkSpec(rate_mbit=RATE_MBIT))),
    homes=(
        HomeSpec("a", (HostSpec("own"),), LinkSpec(delay_ms=DELAY_MS)),
        HomeSpec("b", (HostSpec("wrk"),), LinkSpec(loss=LOSS)),
    ),
)


@pytest.fixture(scope="module")
def lab(module_lab_prefix: str, module_log_dir: Path) -> Iterator[Lab]:
    with Lab(TOPOLOGY, module_lab_prefix, module_log_dir) as built:
        yield built


def ns(lab: Lab, host: str) -> str:
    return lab.host(host).netns


async def test_public_hosts_reach_each_other(lab: Lab) -> None:
    echoes = await probe.udp_echoes(
        ns(lab, "sched"), ns(lab, "relay"), lab.host("relay").ip, count=20, interval=0.01
    )
    assert len(echoes.rtts) == 20
    assert statistics.median(echoes.rtts) < 0.010  # an unshaped veth + bridge


async def test_home_host_reaches_public_through_its_nat(lab: Lab) -> None:
    seen = await probe.seen_source(ns(lab, "own"), ns(lab, "sched"), lab.host("sched").ip)
    assert seen == lab.plan.routers["a"].wan_ip
    seen = await probe.seen_source(ns(lab, "wrk"), ns(lab, "relay"), lab.host("relay").ip)
    assert seen == lab.plan.routers["b"].wan_ip


async def test_public_side_cannot_reach_a_home_host(lab: Lab) -> None:
    own = lab.host("own")
    listener = socket_in(own.netns)
    with listener:
        await listener.bind((own.ip, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        # No route into the home at all...
        direct = await probe.connect_outcome(ns(lab, "sched"), own.ip, port, give_up=3)
        assert direct == "ENETUNREACH"
        # ...and the router forwards no port: its WAN address refuses.
        wan = lab.plan.routers["a"].wan_ip
        via_router = await probe.connect_outcome(ns(lab, "sched"), wan, port, give_up=3)
        assert via_router == "ECONNREFUSED"


async def test_two_homes_cannot_reach_each_other(lab: Lab) -> None:
    wrk = lab.host("wrk")
    listener = socket_in(wrk.netns)
    with listener:
        await listener.bind((wrk.ip, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        outcome = await probe.connect_outcome(ns(lab, "own"), wrk.ip, port, give_up=3)
        assert outcome in {"ENETUNREACH", "EHOSTUNREACH", "timeout"}, outcome
        outcome = await probe.connect_outcome(ns(lab, "wrk"), lab.host("own").ip, 1, give_up=3)
        assert outcome in {"ENETUNREACH", "EHOSTUNREACH", "timeout"}, outcome


async def test_a_cut_host_is_silent_both_ways_until_mended(lab: Lab) -> None:
    relay = lab.host("relay")
    listener = socket_in(relay.netns)
    with listener:
        await listener.bind((relay.ip, 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        await lab.cut("relay")
        try:
            # Silence, not a refusal: as a dead cable or a partition looks to TCP.
            outcome = await probe.connect_outcome(ns(lab, "sched"), relay.ip, port, give_up=2)
            assert outcome == "timeout", outcome
            sched_ip = lab.host("sched").ip
            outcome = await probe.connect_outcome(ns(lab, "relay"), sched_ip, 1, give_up=2)
            assert outcome == "timeout", outcome
        finally:
            await lab.mend("relay")
        outcome = await probe.connect_outcome(ns(lab, "sched"), relay.ip, port, give_up=5)
        assert outcome == "connected", outcome


async def test_configured_delay_is_measured_within_20_percent(lab: Lab) -> None:
    echoes = await probe.udp_echoes(
        ns(lab, "own"), ns(lab, "sched"), lab.host("sched").ip, count=50, interval=0.02
    )
    assert len(echoes.rtts) == 50
    expected = 4 * DELAY_MS / 2 / 1000  # the uplink, both ways
    median = statistics.median(echoes.rtts)
    assert abs(median - expected) <= 0.2 * expected, (median, expected)
    # And the unshaped home's round trip is not delayed: the delay belongs to that link.
    plain = await probe.udp_echoes(
        ns(lab, "sched"), ns(lab, "relay"), lab.host("relay").ip, count=20, interval=0.01
    )
    assert statistics.median(plain.rtts) < expected / 4


async def test_configured_loss_is_measured_within_reason(lab: Lab) -> None:
    # A warm-up, so ARP (which the lossy link may also drop) is settled before counting.
    await probe.udp_echoes(
        ns(lab, "wrk"), ns(lab, "sched"), lab.host("sched").ip, count=20, interval=0.01, wait=0.5
    )
    echoes = await probe.udp_echoes(
        ns(lab, "wrk"), ns(lab, "sched"), lab.host("sched").ip, count=600, interval=0.003
    )
    # Each probe crosses the lossy link twice: answered with probability (1 - LOSS)^2 = 0.81.
    # 600 probes: the standard deviation of the lost fraction is 0.016; allow five of them.
    expected = 1 - (1 - LOSS) ** 2
    assert abs(echoes.lost_fraction - expected) < 0.08, echoes.lost_fraction


async def test_bandwidth_cap_is_measured_within_20_percent(lab: Lab) -> None:
    rate = await probe.tcp_goodput(
        ns(lab, "sched"), ns(lab, "slow"), lab.host("slow").ip, warmup=1.0, seconds=3.0
    )
    cap = RATE_MBIT * 1e6 / 8
    assert abs(rate - cap) <= 0.2 * cap, (rate, cap)
    # The reverse direction is capped as well (a tbf on both ends of the link).
    back = await probe.tcp_goodput(
        ns(lab, "slow"), ns(lab, "sched"), lab.host("sched").ip, warmup=1.0, seconds=2.0
    )
    assert abs(back - cap) <= 0.2 * cap, (back, cap)


def _root_state() -> tuple[str, str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True)
    ours = [line for line in rules.stdout.splitlines() if "198.18." in line or "198.19." in line]
    return links.stdout, "\n".join(ours)


def test_teardown_leaves_no_namespace_device_rule_or_process(
    lab_prefix: str, tmp_path: Path
) -> None:
    links_before, rules_before = _root_state()
    with Lab(TOPOLOGY, lab_prefix, tmp_path) as built:
        assert len(namespaces(lab_prefix)) == 8  # switch, 3 public, 2 routers, 2 home hosts
        forwarder = _run("ip", "netns", "pids", built.plan.switch).split()
        assert len(forwarder) == 1
        assert "MASQUERADE" in _run("ip", "netns", "exec", built.netns_of("a"), "iptables-save")
    assert namespaces(lab_prefix) == []
    assert not Path(f"/proc/{forwarder[0]}").exists()
    links_after, rules_after = _root_state()
    # Nothing was ever made in the root namespace (others' churn there may differ).
    assert "vlab" not in links_after
    assert rules_after == rules_before
    assert _names(links_after) & OUR_DEVICES <= _names(links_before)


OUR_DEVICES = {"eth0", "wan", "lan", "br0", "p0", "p1", "p2", "h1", "h2", "l0"}


def _names(links: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _fail_inside(lab: Lab) -> None:
    assert namespaces(lab.prefix)
    raise ZeroDivisionError


def test_teardown_after_a_failure_inside_the_lab(lab_prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), Lab(TOPOLOGY, lab_prefix, tmp_path) as lab:
        _fail_inside(lab)
    assert namespaces(lab_prefix) == []


def test_plan_is_checked_before_anything_is_built() -> None:
    with pytest.raises(TopologyError, match="names are"):
        plan(Topology("bad", public=(HostSpec("Bad_Name"),)), "vlab-x-")
    with pytest.raises(TopologyError, match="differ"):
        plan(Topology("dup", public=(HostSpec("a"), HostSpec("a"))), "vlab-x-")
    with pytest.raises(TopologyError, match="loss"):
        plan(Topology("l", public=(HostSpec("a", LinkSpec(loss=1.5)),)), "vlab-x-")
    p = plan(TOPOLOGY, "vlab-x-")
    addrs = [h.ip for h in p.hosts.values()] + [r.wan_ip for r in p.routers.values()]
    assert all(a.startswith(("198.18.", "198.19.")) for a in addrs)
    assert len(set(addrs)) == len(addrs)
    assert all(ns.startswith("vlab-x-") for ns in p.namespaces)
    # Only home hosts have a default route, and it points at their own router.
    defaults = [c for c in p.commands if c[3:6] == ["route", "add", "default"]]
    assert sorted(c[2] for c in defaults) == ["vlab-x-own", "vlab-x-wrk"]
