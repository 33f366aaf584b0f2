"""The lending policy: refusals name every limit, and what is admitted never adds up past it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog.caps import Allowance, Caps, NetworkMode
from node.config import WorkerConfig
from node.errors import VmlendError
from worker_role.policy import VM_OVERHEAD_MIB, LendingPolicy, PolicyViolation


@st.composite
def caps(draw: st.DrawFn) -> Caps:
    vcpus = draw(st.integers(1, 8))
    network = draw(st.sampled_from(NetworkMode))
    return Caps(
        vcpus=vcpus,
        cpu_share=draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]).filter(lambda s: s <= vcpus)),
        memory_mib=draw(st.integers(32, 4096)),
        disk_mib=draw(st.integers(1, 8192)),
        disk_bps=draw(st.integers(0, 10_000)),
        disk_iops=draw(st.integers(0, 10_000)),
        network=network,
        net_bps=draw(st.integers(0, 10_000)),
    )


@st.composite
def policies(draw: st.DrawFn) -> LendingPolicy:
    ceilings = {
        "vcpus": draw(st.integers(0, 16)),
        "cpu_share": draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 4.0])),
        "memory_mib": draw(st.integers(0, 8192)),
        "disk_mib": draw(st.integers(0, 16384)),
    }
    for rate in ("disk_bps", "disk_iops", "net_bps"):  # left out: no limit
        ceiling = draw(st.none() | st.integers(0, 20_000))
        if ceiling is not None:
            ceilings[rate] = ceiling
    return LendingPolicy(
        ceilings=ceilings,
        max_concurrent_vms=draw(st.integers(0, 4)),
        network_allowed=draw(st.booleans()),
        vm_overhead_mib=draw(st.sampled_from([0, 64]) | st.integers(0, 512)),
    )


def reference_fits(policy: LendingPolicy, request: Caps, running: list[Caps]) -> bool:
    """The policy restated field by field, as plainly as possible, to check the real one against."""
    everything = [*running, request]
    with_net = [c for c in everything if c.network is NetworkMode.PROXY]
    ok = (
        len(everything) <= policy.max_concurrent_vms
        and sum(c.vcpus for c in everything) <= policy.ceilings["vcpus"]
        and sum(c.cpu_share for c in everything) <= policy.ceilings["cpu_share"] + 1e-9
        and sum(c.memory_mib + policy.vm_overhead_mib for c in everything)
        <= policy.ceilings["memory_mib"]
        and sum(c.disk_mib for c in everything) <= policy.ceilings["disk_mib"]
        and (request.network is NetworkMode.NONE or policy.network_allowed)
    )
    if "disk_bps" in policy.ceilings:
        ok = ok and request.disk_bps > 0
        ok = ok and sum(c.disk_bps for c in everything) <= policy.ceilings["disk_bps"]
    if "disk_iops" in policy.ceilings:
        ok = ok and request.disk_iops > 0
        ok = ok and sum(c.disk_iops for c in everything) <= policy.ceilings["disk_iops"]
    if "net_bps" in policy.ceilings and request.network is NetworkMode.PROXY:
        ok = ok and request.net_bps > 0
        ok = ok and sum(c.net_bps for c in with_net) <= policy.ceilings["net_bps"]
    return ok


@given(policies(), caps(), st.lists(caps(), max_size=3))
def test_check_passes_iff_every_limit_holds(
    policy: LendingPolicy, request: Caps, running: list[Caps]
) -> None:
    expected = reference_fits(policy, request, running)
    assert policy.fits(request, running) is expected
    if expected:
        policy.check(request, running)
    else:
        with pytest.raises(PolicyViolation) as info:
            policy.check(request, running)
        assert info.value.violations
        assert str(info.value) == "; ".join(v.message for v in info.value.violations)


@given(policies(), st.lists(caps(), max_size=12))
def test_admitting_one_by_one_never_exceeds_the_totals(
    policy: LendingPolicy, requests: list[Caps]
) -> None:
    admitted: list[Caps] = []
    for request in requests:
        if policy.fits(request, admitted):
            admitted.append(request)
    assert len(admitted) <= policy.max_concurrent_vms
    assert sum(c.vcpus for c in admitted) <= policy.ceilings["vcpus"]
    assert sum(c.cpu_share for c in admitted) <= policy.ceilings["cpu_share"] + 1e-9
    # What the VMs cost the host, their own memory included, stays within the lender's limit.
    cost = sum(c.memory_mib + policy.vm_overhead_mib for c in admitted)
    assert cost <= policy.ceilings["memory_mib"]
    assert sum(c.disk_mib for c in admitted) <= policy.ceilings["disk_mib"]
    if "disk_bps" in policy.ceilings:
        assert sum(c.disk_bps for c in admitted) <= policy.ceilings["disk_bps"]
    if "disk_iops" in policy.ceilings:
        assert sum(c.disk_iops for c in admitted) <= policy.ceilings["disk_iops"]
    if "net_bps" in policy.ceilings:
        net = sum(c.net_bps for c in admitted if c.network is NetworkMode.PROXY)
        assert net <= policy.ceilings["net_bps"]
    if not policy.network_allowed:
        assert all(c.network is NetworkMode.NONE for c in admitted)


@given(policies(), st.lists(caps(), max_size=3), caps())
def test_remaining_fits_and_bounds_whatever_fits(
    policy: LendingPolicy, running: list[Caps], request: Caps
) -> None:
    left = policy.remaining(running)
    if left is None:
        # Nothing at all is lendable: no request may fit either.
        assert not policy.fits(request, running)
        return
    assert policy.fits(left, running)
    if policy.fits(request, running):
        assert request.vcpus <= left.vcpus
        assert request.cpu_share <= left.cpu_share + 1e-9
        assert request.memory_mib <= left.memory_mib
        assert request.disk_mib <= left.disk_mib
        if "disk_bps" in policy.ceilings:
            assert request.disk_bps <= left.disk_bps
        if "disk_iops" in policy.ceilings:
            assert request.disk_iops <= left.disk_iops
        if request.network is NetworkMode.PROXY:
            assert left.network is NetworkMode.PROXY
            if "net_bps" in policy.ceilings:
                assert request.net_bps <= left.net_bps


def test_message_names_the_limit_asked_and_allowed() -> None:
    policy = LendingPolicy(ceilings={"memory_mib": 256, "vcpus": 4, "cpu_share": 4.0})
    with pytest.raises(PolicyViolation) as info:
        policy.check(Caps(memory_mib=512), [])
    assert str(info.value) == "memory 512 MiB exceeds the lender's limit of 256 MiB"
    assert isinstance(info.value, VmlendError)


def test_message_names_every_limit_exceeded() -> None:
    policy = LendingPolicy(
        ceilings={"vcpus": 2, "cpu_share": 1.0, "memory_mib": 1024}, max_concurrent_vms=2
    )
    running = [Caps(vcpus=1, cpu_share=0.5, memory_mib=768)]
    request = Caps(vcpus=2, cpu_share=1.0, memory_mib=512, network=NetworkMode.PROXY)
    with pytest.raises(PolicyViolation) as info:
        policy.check(request, running, scheduler="12D3KooWother")
    assert [v.limit for v in info.value.violations] == [
        "vcpus",
        "cpu_share",
        "memory_mib",
        "network",
    ]
    text = str(info.value)
    assert "vCPUs 2 exceeds what is left of the lender's limit of 2 (1 in use, 1 left)" in text
    assert "memory 512 MiB exceeds what is left of the lender's limit of 1 GiB" in text
    assert "network access is not allowed by the lender" in text
    # An empty scheduler set serves anyone.
    assert "scheduler" not in text


def test_unlimited_rate_is_refused_when_the_lender_caps_it() -> None:
    policy = LendingPolicy(
        ceilings={"net_bps": 1_000_000, "disk_bps": 10_000_000, "disk_iops": 500},
        network_allowed=True,
    )
    with pytest.raises(PolicyViolation) as info:
        policy.check(Caps(network=NetworkMode.PROXY), [])
    assert str(info.value) == (
        "disk rate unlimited exceeds the lender's limit of 9.54 MiB/s; "
        "disk operations unlimited exceeds the lender's limit of 500 IOPS; "
        "network rate unlimited exceeds the lender's limit of 977 KiB/s"
    )
    policy.check(Caps(network=NetworkMode.PROXY, net_bps=1_000_000, disk_bps=1, disk_iops=1), [])
    # A VM without network asks nothing of the network budget, whatever its net_bps says.
    policy.check(Caps(disk_bps=1, disk_iops=1), [])
    # The operations of every VM running count against the limit together.
    with pytest.raises(PolicyViolation, match="disk operations 200 IOPS exceeds what is left"):
        policy.check(Caps(disk_bps=1, disk_iops=200), [Caps(disk_bps=1, disk_iops=400)])


def test_concurrent_vms_and_schedulers() -> None:
    policy = LendingPolicy(
        ceilings={"vcpus": 8, "cpu_share": 8.0}, max_concurrent_vms=1, schedulers=frozenset({"A"})
    )
    assert policy.serves("A")
    assert not policy.serves("B")
    assert policy.fits(Caps(), [], scheduler="A")
    assert not policy.fits(Caps(), [], scheduler="B")
    with pytest.raises(PolicyViolation, match="2 VMs at once exceeds the lender's limit of 1"):
        policy.check(Caps(), [Caps()])
    assert policy.remaining([Caps()]) is None


def test_remaining_example() -> None:
    policy = LendingPolicy(
        ceilings={
            "vcpus": 4,
            "cpu_share": 1.5,
            "memory_mib": 2048,
            "disk_mib": 4096,
            "net_bps": 1000,
        },
        max_concurrent_vms=3,
        network_allowed=True,
    )
    running = [
        Caps(vcpus=2, cpu_share=1.0, memory_mib=1024, network=NetworkMode.PROXY, net_bps=400)
    ]
    assert policy.remaining(running) == Caps(
        vcpus=2,
        cpu_share=0.5,
        memory_mib=1024,
        disk_mib=4096 - 256,
        network=NetworkMode.PROXY,
        net_bps=600,
        net_allow=(),  # the lender lists no destination: none is offered
    )
    # Network budget spent: more VMs may run, but only without network.
    spent = [*running, Caps(cpu_share=0.25, network=NetworkMode.PROXY, net_bps=600)]
    left = policy.remaining(spent)
    assert left is not None
    assert left.network is NetworkMode.NONE


def test_validation() -> None:
    with pytest.raises(ValueError, match="memory_mib must be >= 0"):
        LendingPolicy(ceilings={"memory_mib": -1})
    with pytest.raises(ValueError, match="cpu_share"):
        LendingPolicy(ceilings={"cpu_share": float("nan")})
    with pytest.raises(ValueError, match="disk_iops"):
        LendingPolicy(ceilings={"disk_iops": -1})
    with pytest.raises(ValueError, match="max_concurrent_vms"):
        LendingPolicy(max_concurrent_vms=-1)
    with pytest.raises(ValueError, match="no limit is named 'pids'"):
        LendingPolicy(ceilings={"pids": 1})  # no such limit
    # Whatever collection config hands over, the policy stays hashable.
    assert hash(LendingPolicy(schedulers={"A"})) == hash(LendingPolicy(schedulers=frozenset("A")))  # type: ignore[arg-type]


def test_task_destinations_must_be_within_the_lenders_allow_list() -> None:
    policy = LendingPolicy(
        network_allowed=True, net_allow=("*.debian.org:80", "pypi.org:443", "10.0.0.5:8080")
    )

    def asking(*entries: str) -> Caps:
        return Caps(network=NetworkMode.PROXY, net_allow=entries)

    policy.check(asking("deb.debian.org:80", "*.security.debian.org:80", "PyPI.org:443"), [])
    policy.check(asking("10.0.0.5:8080"), [])
    policy.check(asking(), [])  # a task may ask for less (here: nothing reachable)
    with pytest.raises(PolicyViolation) as info:
        policy.check(asking("debian.org:80", "pypi.org", "10.0.0.5:22", "bad entry"), [])
    assert str(info.value) == (
        "network destinations debian.org:80, pypi.org, 10.0.0.5:22 (internal: only an exact rule "
        "allows it), 'bad entry' are outside the lender's allow-list (*.debian.org:80, "
        "pypi.org:443, 10.0.0.5:8080)"
    )
    left = policy.remaining([])
    assert left is not None
    assert left.net_allow == policy.net_allow
    assert policy.fits(left, [])
    with pytest.raises(ValueError, match="bad allow-list entry"):
        LendingPolicy(net_allow=("exa mple.org",))


def _asking(*entries: str) -> Caps:
    return Caps(network=NetworkMode.PROXY, net_allow=entries)


def test_an_empty_lender_list_admits_no_destination() -> None:
    # The finding: network_allowed with an empty net_allow let a task name any destination.
    policy = LendingPolicy.of(WorkerConfig(network_allowed=True))
    assert policy.net_allow == ()
    with pytest.raises(PolicyViolation, match=r"example.org:443 are outside .*\(empty\)"):
        policy.check(_asking("example.org:443"), [])
    with pytest.raises(PolicyViolation, match=r"\* are outside"):
        policy.check(_asking("*"), [])
    policy.check(_asking(), [])  # network with nowhere to go: harmless
    left = policy.remaining([])
    assert left is not None
    assert left.net_allow == ()


@pytest.mark.parametrize(
    "entry", ["169.254.169.254:80", "127.0.0.1:22", "[::1]:22", "192.168.1.1", "[fd00::2]:80"]
)
def test_a_star_lender_refuses_a_task_naming_an_internal_address(entry: str) -> None:
    # The finding: the lender's "*" covered 169.254.169.254:80 and 127.0.0.1:22.
    policy = LendingPolicy(network_allowed=True, net_allow=("*",))
    with pytest.raises(PolicyViolation, match=r"internal: only an exact rule allows it"):
        policy.check(_asking("example.org:443", entry), [])
    policy.check(_asking("example.org:443", "*", "93.184.215.14:443"), [])
    LendingPolicy(network_allowed=True, net_allow=("*", entry)).check(_asking(entry), [])


def test_the_scheduler_refuses_what_the_offer_cannot_reach() -> None:
    # Matching uses the offer's room (the lender's list as offered), so a task asking wider than
    # the lender is refused at lease time, not found out inside the VM.
    lender = LendingPolicy(network_allowed=True, net_allow=("*", "127.0.0.1:8080"))
    room = lender.remaining([])
    assert room is not None
    allowance = Allowance.room(room)
    assert not allowance.violations(_asking("127.0.0.1:8080", "example.org:443"))
    (violation,) = allowance.violations(_asking("169.254.169.254:80"))
    assert violation.limit == "net_allow"
    empty = LendingPolicy(network_allowed=True).remaining([])
    assert empty is not None
    assert Allowance.room(empty).violations(_asking("example.org:443"))


def test_a_huge_size_is_shown_in_units_a_person_reads() -> None:
    policy = LendingPolicy(ceilings={"memory_mib": 4096})
    with pytest.raises(PolicyViolation) as info:
        policy.check(Caps(memory_mib=90 * 1024 * 1024), [])
    assert str(info.value) == "memory 90 TiB exceeds the lender's limit of 4 GiB"


def test_memory_counts_what_each_vm_costs_beyond_its_guest_and_says_so() -> None:
    policy = LendingPolicy.of(WorkerConfig(limits={"max_memory": 1 << 30}))
    assert policy.vm_overhead_mib == VM_OVERHEAD_MIB > 0
    left = policy.remaining([])
    assert left is not None
    assert left.memory_mib == 1024 - VM_OVERHEAD_MIB
    with pytest.raises(PolicyViolation, match=r"MiB per VM go to running the VM itself"):
        policy.check(Caps(memory_mib=1024), [])
    policy.check(Caps(memory_mib=1024 - VM_OVERHEAD_MIB), [])
