"""``vmlend node start`` refuses a configuration the node could not apply, before starting."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import main


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[worker]\nnet_allow = ["10.0.0.0/8"]\n', "worker.net_allow"),  # CIDRs: not a rule
        ('[worker]\nnet_allow = ["x.org:99999"]\n', "worker.net_allow"),
        ('[worker]\nmax_memory = "lots"\n', "worker.max_memory"),
    ],
)
def test_bad_lending_policy_stops_start_up_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, key: str
) -> None:
    (tmp_path / "node.toml").write_text(toml)
    assert main(["node", "start", "--data", str(tmp_path), "--roles", "worker"]) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err
    assert str(tmp_path / "node.toml") in err
    assert not (tmp_path / "rpc.sock").exists()


def test_the_egress_grammar_is_the_configs_own(tmp_path: Path) -> None:
    # One grammar for net_allow: the config parses it with the proxy's own rules, whatever the
    # roles, so a file that one node accepts no other node refuses.
    from node.config import load_config
    from node.errors import ConfigError

    (tmp_path / "node.toml").write_text('[worker]\nnet_allow = ["10.0.0.0/8"]\n')
    with pytest.raises(ConfigError, match=r"worker\.net_allow"):
        load_config(tmp_path, {"node.roles": ["owner"]})
