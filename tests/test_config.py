"""node.config: four layers, one frozen typed object, errors that name file, key and expectation."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import node.config as config_module
from node.config import (
    Config,
    Role,
    default_bootstrap_path,
    load_config,
    resolve_data_dir,
)
from node.config_kinds import is_multiaddr, is_peer_id
from node.errors import ConfigError
from node.units import GIB, MIB, format_duration, format_size

REPO = Path(__file__).resolve().parent.parent
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def peer_id(seed: int) -> str:
    """The libp2p peer ID of a made-up Ed25519 key: identity multihash of the protobuf key."""
    raw = bytes([0x00, 36, 0x08, 0x01, 0x12, 32]) + seed.to_bytes(32, "big")
    n, text = int.from_bytes(raw, "big"), ""
    while n:
        n, digit = divmod(n, 58)
        text = B58[digit] + text
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + text


PEER_A, PEER_B, PEER_C = peer_id(1), peer_id(2), peer_id(3)
ADDR_A = f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER_A}"
ADDR_B = f"/dns4/boot.example.org/tcp/4001/p2p/{PEER_B}"
ADDR_C = f"/ip6/::1/tcp/4001/p2p/{PEER_C}"
KEY_A, KEY_B, KEY_C = "aa" * 32, "bb" * 32, "cc" * 32


class Layers:
    """A data dir and a bootstrap file in tmp_path, written only when a test asks."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.data.mkdir()
        self.bootstrap = tmp_path / "bootstrap.toml"
        self.bootstrap.write_text("")
        self.node_toml = self.data / "node.toml"

    def load(self, flags: dict[str, Any] | None = None) -> Config:
        return load_config(self.data, flags, env={"VMLEND_BOOTSTRAP": str(self.bootstrap)})

    def error(self, flags: dict[str, Any] | None = None) -> str:
        with pytest.raises(ConfigError) as info:
            self.load(flags)
        return str(info.value)


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


# --- the layers ---------------------------------------------------------------------------------


def test_defaults_when_no_file_sets_anything(layers: Layers) -> None:
    config = layers.load()
    assert config == Config(data_dir=layers.data, sources=(str(layers.bootstrap),))
    assert config.node.roles == (Role.WORKER, Role.OWNER)
    assert config.network.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert config.network.heartbeat_interval == 2.0
    assert config.network.peer_timeout == 6.0
    assert config.catalog.chunk_quota == 20 * GIB
    assert config.worker.limits["max_memory"] == GIB
    assert config.worker.limits["max_disk"] == 2 * GIB
    assert config.worker.vm_dir == Path("/var/lib/vmlend/vm")
    assert config.scheduler.lease_timeout == 30.0


def test_shipped_bootstrap_toml_is_found_next_to_the_package_and_loads(tmp_path: Path) -> None:
    path, required = default_bootstrap_path({})
    assert path == REPO / "bootstrap.toml"
    assert not required
    config = load_config(tmp_path, env={})
    assert config.sources == (str(REPO / "bootstrap.toml"),)


def test_named_bootstrap_file_must_exist(layers: Layers) -> None:
    layers.bootstrap.unlink()
    assert layers.error() == f"{layers.bootstrap}: file not found"


@pytest.mark.parametrize(
    ("in_bootstrap", "in_node_toml", "in_flags", "expected"),
    [
        (False, False, False, 5.0),
        (True, False, False, 7.0),
        (False, True, False, 8.0),
        (True, True, False, 8.0),
        (True, False, True, 9.0),
        (False, True, True, 9.0),
        (True, True, True, 9.0),
    ],
)
def test_each_layer_overrides_the_one_before(
    layers: Layers, in_bootstrap: bool, in_node_toml: bool, in_flags: bool, expected: float
) -> None:
    if in_bootstrap:
        layers.bootstrap.write_text('[network]\ndial_timeout = "7s"\n')
    if in_node_toml:
        layers.node_toml.write_text('[network]\ndial_timeout = "8s"\n')
    flags = {"network.dial_timeout": "9s"} if in_flags else {}
    config = layers.load(flags)
    assert config.network.dial_timeout == expected
    # Only what was given changes: a neighbouring key keeps its default.
    assert config.network.stream_deadline == 30.0


def test_sources_list_the_files_read_in_order(layers: Layers) -> None:
    layers.node_toml.write_text("")
    assert layers.load().sources == (str(layers.bootstrap), str(layers.node_toml))


def test_node_toml_extends_bootstrap_peers_and_publishers(layers: Layers) -> None:
    layers.bootstrap.write_text(
        f'[network]\nbootstrap = ["{ADDR_A}"]\n[catalog]\ntrusted_publishers = ["{KEY_A}"]\n'
    )
    layers.node_toml.write_text(
        f'[network]\nbootstrap = ["{ADDR_B}", "{ADDR_A}"]\n'
        f'[catalog]\ntrusted_publishers = ["{KEY_B}", "{KEY_A.upper()}"]\n'
    )
    config = layers.load()
    assert config.network.bootstrap == (ADDR_A, ADDR_B)
    assert config.catalog.trusted_publishers == (KEY_A, KEY_B)
    assert config.catalog.trusted_publisher_keys == (b"\xaa" * 32, b"\xbb" * 32)


def test_flags_replace_even_the_extended_lists(layers: Layers) -> None:
    layers.bootstrap.write_text(f'[network]\nbootstrap = ["{ADDR_A}"]\n')
    layers.node_toml.write_text(f'[network]\nbootstrap = ["{ADDR_B}"]\n')
    config = layers.load({"network.bootstrap": [ADDR_C]})
    assert config.network.bootstrap == (ADDR_C,)


def test_node_toml_replaces_other_lists(layers: Layers) -> None:
    layers.bootstrap.write_text('[network]\nlisten = ["/ip4/0.0.0.0/tcp/4001"]\n')
    layers.node_toml.write_text('[network]\nlisten = ["/ip6/::/tcp/4002"]\n')
    assert layers.load().network.listen == ("/ip6/::/tcp/4002",)


def test_flags_given_as_command_line_words(layers: Layers) -> None:
    config = layers.load(
        {
            "node.roles": "worker,scheduler",
            "worker.max_vcpus": "4",
            "worker.max_cpu_share": "2.5",
            "worker.network_allowed": "yes",
            "worker.max_memory": "2G",
            "worker.max_net_rate": "1MiB/s",
            "network.listen": ["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002"],
        }
    )
    assert config.node.roles == (Role.WORKER, Role.SCHEDULER)
    assert config.has_role("scheduler")
    assert not config.has_role(Role.OWNER)
    assert config.worker.limits["max_vcpus"] == 4
    assert config.worker.limits["max_cpu_share"] == 2.5
    assert config.worker.network_allowed is True
    assert config.worker.limits["max_memory"] == 2 * GIB
    assert config.worker.limits["max_net_rate"] == MIB
    assert config.network.listen == ("/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002")


def test_every_key_from_a_file(layers: Layers) -> None:
    layers.node_toml.write_text(
        f"""
        [node]
        roles = ["scheduler"]
        name = "lab box"
        log_level = "DEBUG"
        [network]
        listen = ["/ip4/0.0.0.0/tcp/4001"]
        bootstrap = ["{ADDR_B}"]
        heartbeat_interval = "500ms"
        peer_timeout = 3
        dial_timeout = 1.5
        stream_deadline = "1m"
        [catalog]
        trusted_publishers = ["{KEY_C}"]
        chunk_quota = "100GB"
        [worker]
        max_vcpus = 8
        max_cpu_share = 4
        max_memory = "16GiB"
        max_disk = 10737418240
        max_concurrent_vms = 0
        network_allowed = true
        net_allow = ["deb.debian.org:443", "*.pypi.org", "10.0.0.5:8080", "[2001:db8::1]:80"]
        max_net_rate = "10MB/s"
        max_disk_rate = "50MiB"
        max_disk_iops = 500
        schedulers = ["{PEER_A}"]
        shares = {{ "{PEER_B}" = 3, "{PEER_A}" = 1 }}
        vm_dir = "/srv/vmlend/vm"
        [scheduler]
        name = "sched-1"
        lease_timeout = "2m"
        """
    )
    c = layers.load()
    assert c.node.roles == (Role.SCHEDULER,)
    assert (c.node.name, c.node.log_level) == ("lab box", "debug")
    assert c.network.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert c.network.bootstrap == (ADDR_B,)
    assert (c.network.heartbeat_interval, c.network.peer_timeout) == (0.5, 3.0)
    assert (c.network.dial_timeout, c.network.stream_deadline) == (1.5, 60.0)
    assert c.catalog.trusted_publishers == (KEY_C,)
    assert c.catalog.chunk_quota == 100 * 10**9
    w = c.worker
    assert dict(w.limits) == {
        "max_vcpus": 8, "max_cpu_share": 4.0, "max_memory": 16 * GIB, "max_disk": 10 * GIB,
        "max_net_rate": 10**7, "max_disk_rate": 50 * MIB, "max_disk_iops": 500,
    }  # fmt: skip
    assert (w.max_concurrent_vms, w.network_allowed) == (0, True)
    assert w.net_allow == ("deb.debian.org:443", "*.pypi.org", "10.0.0.5:8080", "[2001:db8::1]:80")
    assert w.schedulers == (PEER_A,)
    assert dict(w.shares) == {PEER_A: 1, PEER_B: 3}
    assert w.vm_dir == Path("/srv/vmlend/vm")
    assert (c.scheduler.name, c.scheduler.lease_timeout) == ("sched-1", 120.0)


# --- errors name the file, the key and what was expected ----------------------------------------


def test_the_example_error_from_the_brief(layers: Layers) -> None:
    layers.node_toml.write_text('[worker]\nmax_memory = "lots"\n')
    with pytest.raises(ConfigError) as info:
        layers.load()
    assert str(info.value) == (
        f'{layers.node_toml}: worker.max_memory: expected a size like "512MiB" of at least 32MiB, '
        'got "lots"'
    )
    assert info.value.source == str(layers.node_toml)
    assert info.value.key == "worker.max_memory"


def test_unknown_section(layers: Layers) -> None:
    layers.node_toml.write_text("[wroker]\nmax_vcpus = 2\n")
    message = layers.error()
    assert message.startswith(f"{layers.node_toml}: unknown section [wroker]")
    assert "worker" in message  # the known sections are listed


def test_unknown_key(layers: Layers) -> None:
    layers.node_toml.write_text('[worker]\nmax_ram = "1GiB"\n')
    message = layers.error()
    assert message.startswith(f"{layers.node_toml}: worker.max_ram: unknown key")
    assert "max_memory" in message


@pytest.mark.parametrize("line", ['hours = ["22:00-07:00"]', "idle_only = true"])
def test_lending_windows_are_refused_until_they_are_enforced(layers: Layers, line: str) -> None:
    # A limit the worker would silently ignore is worse than an error the lender can read.
    layers.node_toml.write_text(f"[worker]\n{line}\n")
    assert ": unknown key" in layers.error()


def test_unknown_key_in_bootstrap_toml_names_that_file(layers: Layers) -> None:
    layers.bootstrap.write_text("[network]\nboostrap = []\n")
    assert layers.error().startswith(f"{layers.bootstrap}: network.boostrap: unknown key")


@pytest.mark.parametrize("dotted", ["worker.max_ram", "wroker.max_vcpus", "worker", "", ".x"])
def test_unknown_flag(layers: Layers, dotted: str) -> None:
    shown = dotted or '""'
    assert layers.error({dotted: "1"}).startswith(f"command line: {shown}: unknown")


def test_a_key_outside_any_section_is_an_unknown_section(layers: Layers) -> None:
    layers.node_toml.write_text("max_vcpus = 2\n")
    assert layers.error().startswith(f"{layers.node_toml}: unknown section [max_vcpus]")


def test_a_section_that_is_not_a_table(layers: Layers) -> None:
    layers.node_toml.write_text("worker = 3\n")
    assert layers.error() == f"{layers.node_toml}: worker: expected a table [worker], got 3"


@pytest.mark.parametrize(
    ("line", "dotted", "expected"),
    [
        ('max_vcpus = "2"', "worker.max_vcpus", 'expected an integer from 1 to 1024, got "2"'),
        ("max_vcpus = true", "worker.max_vcpus", "expected an integer from 1 to 1024, got true"),
        ("max_vcpus = 0", "worker.max_vcpus", "expected an integer from 1 to 1024, got 0"),
        ("max_vcpus = 2.0", "worker.max_vcpus", "got 2.0"),
        ("max_cpu_share = 0", "worker.max_cpu_share", "expected a number above 0.0"),
        ('max_cpu_share = "1"', "worker.max_cpu_share", 'got "1"'),
        ("network_allowed = 1", "worker.network_allowed", "expected true or false, got 1"),
        ('network_allowed = "yes"', "worker.network_allowed", 'got "yes"'),
        ('max_memory = "16MiB"', "worker.max_memory", 'of at least 32MiB, got "16MiB"'),
        ('max_memory = "-1GiB"', "worker.max_memory", 'got "-1GiB"'),
        ("max_memory = -5", "worker.max_memory", "got -5"),
        ("max_memory = 1.5", "worker.max_memory", "got 1.5"),
        ('max_net_rate = "fast"', "worker.max_net_rate", 'expected a rate like "10MiB/s"'),
        ('net_allow = "x.org"', "worker.net_allow", "expected a list of at most 64 destinations"),
        ('net_allow = ["ok.org", "bad host"]', "worker.net_allow", '"bad host" (item 2)'),
        ('schedulers = ["Qm-not-a-peer"]', "worker.schedulers", "expected a list of peer IDs"),
        ('shares = ["x"]', "worker.shares", "expected a table of peer IDs to positive integer"),
        ('shares = { "Qm-bad" = 1 }', "worker.shares", 'got "Qm-bad" (not a peer ID)'),
        (f'shares = {{ "{PEER_A}" = 0 }}', "worker.shares", f"got 0 (the share of {PEER_A})"),
        (f'shares = {{ "{PEER_A}" = 1.5 }}', "worker.shares", "got 1.5 (the share of"),
        (f'shares = {{ "{PEER_A}" = true }}', "worker.shares", "got true (the share of"),
        ('vm_dir = "relative/vm"', "worker.vm_dir", 'expected an absolute path, got "relative/vm"'),
        ("vm_dir = 3", "worker.vm_dir", "expected an absolute path, got 3"),
    ],
)
def test_wrong_type_or_bad_value_in_worker(
    layers: Layers, line: str, dotted: str, expected: str
) -> None:
    layers.node_toml.write_text(f"[worker]\n{line}\n")
    message = layers.error()
    assert message.startswith(f"{layers.node_toml}: {dotted}: expected ")
    assert expected in message


@pytest.mark.parametrize(
    ("toml", "dotted", "expected"),
    [
        ('[node]\nroles = ["lender"]', "node.roles", 'got "lender" (item 1)'),
        ('[node]\nroles = "worker"', "node.roles", "expected a list of roles"),
        ('[node]\nname = "a\\nb"', "node.name", "printable"),
        ('[node]\nlog_level = "loud"', "node.log_level", 'one of "debug"'),
        ('[network]\nheartbeat_interval = "0s"', "network.heartbeat_interval", "above zero"),
        ('[network]\ndial_timeout = "soon"', "network.dial_timeout", 'got "soon"'),
        ("[network]\ndial_timeout = -1", "network.dial_timeout", "got -1"),
        ('[network]\nlisten = ["/ip4/1.2.3.4/udp/1"]', "network.listen", "listen multiaddrs"),
        (
            f'[network]\nbootstrap = ["{ADDR_A.rsplit("/p2p/", 1)[0]}"]',
            "network.bootstrap",
            "ending in /p2p/<peer id>",
        ),
        ('[catalog]\ntrusted_publishers = ["abc"]', "catalog.trusted_publishers", "64 hex"),
        ('[catalog]\nchunk_quota = "a lot"', "catalog.chunk_quota", 'got "a lot"'),
        ("[scheduler]\nlease_timeout = false", "scheduler.lease_timeout", "got false"),
    ],
)
def test_bad_values_in_other_sections(
    layers: Layers, toml: str, dotted: str, expected: str
) -> None:
    layers.node_toml.write_text(toml + "\n")
    message = layers.error()
    assert message.startswith(f"{layers.node_toml}: {dotted}: expected ")
    assert expected in message


def test_bad_flag_value_names_the_command_line(layers: Layers) -> None:
    assert layers.error({"worker.max_vcpus": "many"}) == (
        'command line: worker.max_vcpus: expected an integer from 1 to 1024, got "many"'
    )


def test_invalid_toml_names_the_file(layers: Layers) -> None:
    layers.node_toml.write_text("[worker\n")
    assert layers.error().startswith(f"{layers.node_toml}: not valid TOML: ")


def test_non_utf8_names_the_file(layers: Layers) -> None:
    layers.node_toml.write_bytes(b"[node]\nname = '\xff'\n")
    assert layers.error().startswith(f"{layers.node_toml}: not UTF-8 text")


def test_unreadable_node_toml_names_the_file(layers: Layers) -> None:
    layers.node_toml.mkdir()  # reading a directory fails whoever we are (tests may run as root)
    assert layers.error().startswith(f"{layers.node_toml}: cannot read")


def test_cpu_share_above_vcpus_blames_the_latest_layer(layers: Layers) -> None:
    layers.node_toml.write_text("[worker]\nmax_vcpus = 4\nmax_cpu_share = 3.5\n")
    assert layers.load().worker.limits["max_cpu_share"] == 3.5
    assert layers.error({"worker.max_vcpus": 2}) == (
        "command line: worker.max_vcpus: expected at least worker.max_cpu_share (3.5), got 2"
    )
    assert layers.error({"worker.max_cpu_share": 5}) == (
        "command line: worker.max_cpu_share: expected at most worker.max_vcpus (4), got 5.0"
    )
    layers.node_toml.write_text("[worker]\nmax_cpu_share = 1.5\n")
    assert layers.error() == (
        f"{layers.node_toml}: worker.max_cpu_share: expected at most worker.max_vcpus (1), got 1.5"
    )


def test_peer_timeout_must_exceed_heartbeat(layers: Layers) -> None:
    layers.node_toml.write_text('[network]\npeer_timeout = "2s"\n')
    assert layers.error() == (
        f"{layers.node_toml}: network.peer_timeout: "
        "expected more than network.heartbeat_interval (2s), got 2s"
    )
    assert layers.error({"network.heartbeat_interval": "10s"}) == (
        "command line: network.heartbeat_interval: "
        "expected less than network.peer_timeout (2s), got 10s"
    )


# --- the object ---------------------------------------------------------------------------------


def test_config_is_frozen_all_the_way_down(layers: Layers) -> None:
    config = layers.load({"network.listen": ["/ip4/127.0.0.1/tcp/1"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data_dir = Path("/elsewhere")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.worker.max_concurrent_vms = 64  # type: ignore[misc]
    # Lists come out as tuples, so nothing inside can be changed in place either.
    assert isinstance(config.network.listen, tuple)
    assert isinstance(config.node.roles, tuple)
    assert hash(config.worker.net_allow) is not None


def test_flags_mapping_is_not_changed(layers: Layers) -> None:
    flags: dict[str, Any] = {"node.roles": ["worker"]}
    layers.load(flags)
    assert flags == {"node.roles": ["worker"]}


# --- data dir -----------------------------------------------------------------------------------


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    env = {"VMLEND_DATA": str(tmp_path / "env"), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert resolve_data_dir(str(tmp_path / "flag"), env=env) == tmp_path / "flag"
    assert resolve_data_dir(None, env=env) == tmp_path / "env"
    del env["VMLEND_DATA"]
    assert resolve_data_dir(None, env=env) == tmp_path / "xdg" / "vmlend"
    del env["XDG_DATA_HOME"]
    assert resolve_data_dir(None, env=env) == tmp_path / "home" / ".local/share/vmlend"


def test_data_dir_from_the_real_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMLEND_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"


def test_data_dir_empty_or_relative_variables_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {"VMLEND_DATA": "", "XDG_DATA_HOME": "relative/xdg"}
    assert resolve_data_dir("", env=env) == tmp_path / ".local/share/vmlend"


def test_data_dir_is_absolute_and_expands_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("~/d", env={}) == tmp_path / "d"
    assert resolve_data_dir("rel", env={}) == tmp_path / "rel"
    assert resolve_data_dir(None, env={"VMLEND_DATA": "~/e"}) == tmp_path / "e"


# --- the documentation matches the code ---------------------------------------------------------


def _schema_keys() -> list[str]:
    return [f"{s}.{k}" for s, keys in config_module._SCHEMA.items() for k in keys]


def test_the_example_file_uncommented_gives_the_defaults(layers: Layers) -> None:
    example = (REPO / "node.toml.example").read_text()
    uncommented = re.sub(r"(?m)^# (\w+ = )", r"\1", example)
    layers.node_toml.write_text(uncommented)
    config = layers.load()
    assert dataclasses.replace(config, sources=()) == Config(data_dir=layers.data)
    found = {
        f"{section}.{key}"
        for section, keys in __import__("tomllib").loads(uncommented).items()
        for key in keys
    }
    assert found == set(_schema_keys())


def test_every_key_is_in_the_module_docstring() -> None:
    doc = config_module.__doc__ or ""
    section = ""
    documented = set()
    for line in doc.splitlines():
        if m := re.fullmatch(r"\s+\[(\w+)\].*", line):
            section = m.group(1)
        elif m := re.match(r"\s+(\w+) = ", line):
            documented.add(f"{section}.{m.group(1)}")
    assert documented == set(_schema_keys())


# --- shapes of addresses and keys ---------------------------------------------------------------


def test_peer_id_helper_matches_a_known_libp2p_peer_id() -> None:
    # The peer ID py-libp2p gives the all-zero Ed25519 public key.
    assert peer_id(0) == "12D3KooW9pNAk8aiBuGVQtWRdbkLmo5qVL3e2h5UxbN2Nz9ttwiw"
    assert is_peer_id(peer_id(0))
    assert is_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    assert not is_peer_id(peer_id(0)[:-1])
    assert not is_peer_id(peer_id(0)[:-1] + "0")  # 0 is not a base58 digit


@pytest.mark.parametrize(
    ("addr", "listen_ok", "dial_ok"),
    [
        ("/ip4/127.0.0.1/tcp/0", True, False),
        ("/ip4/0.0.0.0/tcp/4001", True, False),
        ("/ip6/::/tcp/4001", True, False),
        (ADDR_A, False, True),
        (ADDR_B, False, True),
        (ADDR_C, False, True),
        (f"/ip4/10.0.0.1/tcp/0/p2p/{PEER_A}", False, False),
        ("/dns4/host/tcp/1", False, False),
        ("/ip4/300.0.0.1/tcp/1", False, False),
        ("/ip4/::1/tcp/1", False, False),
        ("/ip4/1.2.3.4/udp/1", False, False),
        ("/ip4/1.2.3.4/tcp/65536", False, False),
        ("/ip4/1.2.3.4/tcp/x", False, False),
        ("ip4/1.2.3.4/tcp/1", False, False),
        ("/ip4/1.2.3.4/tcp/1/", False, False),
        (f"/ip4/1.2.3.4/tcp/1/ipfs/{PEER_A}", False, False),
        (f"/dns4/-bad-/tcp/1/p2p/{PEER_A}", False, False),
        ("", False, False),
    ],
)
def test_multiaddr_shapes(addr: str, listen_ok: bool, dial_ok: bool) -> None:
    assert is_multiaddr(addr, dialable=False) is listen_ok
    assert is_multiaddr(addr, dialable=True) is dial_ok


# --- Hypothesis ---------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(st.integers(min_value=32 * MIB, max_value=2**50))
def test_any_size_written_by_format_size_reads_back(layers: Layers, n: int) -> None:
    assert layers.load({"worker.max_memory": format_size(n)}).worker.limits["max_memory"] == n


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(st.floats(min_value=1e-3, max_value=1e9, allow_nan=False))
def test_any_duration_written_by_format_duration_reads_back(layers: Layers, s: float) -> None:
    assert layers.load({"scheduler.lease_timeout": format_duration(s)}).scheduler.lease_timeout == s


TOML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(key=st.sampled_from(_schema_keys()), value=TOML_VALUES)
def test_any_value_for_any_key_is_accepted_or_a_config_error_naming_it(
    layers: Layers, key: str, value: object
) -> None:
    error: ConfigError | None = None
    try:
        layers.load({key: value})
    except ConfigError as e:
        error = e
    if error is not None:
        assert error.source == "command line"
        assert error.key is not None
        assert error.key.startswith(key.split(".")[0] + ".")


def test_shares_from_a_flag(layers: Layers) -> None:
    config = layers.load({"worker.shares": f"{PEER_A}=2, {PEER_B}=5"})
    assert config.worker.shares == tuple(sorted([(PEER_A, 2), (PEER_B, 5)]))
    with pytest.raises(ConfigError, match="the share of"):
        layers.load({"worker.shares": f"{PEER_A}=none"})


def test_a_scrub_interval_of_zero_means_never_but_other_durations_must_be_positive(
    layers: Layers,
) -> None:
    layers.node_toml.write_text('[catalog]\nscrub_interval = "0"\nscrub_rate = "0"\n')
    config = layers.load()
    assert (config.catalog.scrub_interval, config.catalog.scrub_rate) == (0.0, 0)
    layers.node_toml.write_text('[catalog]\nscrub_interval = "1d12h"\nscrub_rate = "4MiB/s"\n')
    config = layers.load()
    assert (config.catalog.scrub_interval, config.catalog.scrub_rate) == (129600.0, 4 << 20)
    layers.node_toml.write_text('[catalog]\nscrub_interval = "-1s"\n')
    assert "scrub_interval" in layers.error()
    layers.node_toml.write_text('[network]\ndial_timeout = "0"\n')
    assert "above zero" in layers.error()


def test_a_lenders_allow_list_longer_than_an_offer_can_carry_is_refused(tmp_path: Path) -> None:
    # Offers carry the lender's list in Caps, whose wire form takes at most MAX_RULES entries:
    # a longer list started fine and produced offers no scheduler could parse.
    from node.allow_rules import MAX_RULES

    rules = ", ".join(f'"h{i}.org:443"' for i in range(MAX_RULES + 1))
    (tmp_path / "node.toml").write_text(f"[worker]\nnet_allow = [{rules}]\n")
    with pytest.raises(ConfigError, match=rf"worker\.net_allow.*at most {MAX_RULES}"):
        load_config(tmp_path, env={})
