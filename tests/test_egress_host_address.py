"""The host's own public addresses and the metadata address, through a real egress proxy, with
real listeners bound on them: in a network namespace of its own (tests/egress_helpers/
netns_probe.py), where the "host" has public addresses and 169.254.169.254 without routing
anything out of this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from tests.egress_helpers.netns_probe import METADATA, PUBLIC_V4, PUBLIC_V6

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "HTTP/1.1 403 Forbidden"
CONNECTED = "HTTP/1.1 200 Connection established"


async def test_the_hosts_public_addresses_and_the_metadata_address_are_refused() -> None:
    probe = ["unshare", "--net", sys.executable, "-m", "tests.egress_helpers.netns_probe"]
    with trio.fail_after(120):
        done = await trio.run_process(
            probe, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)
    results = report["results"]
    own = "this host's own address the lender's allow-list does not name"
    for label in ("own_v4", "own_v6", "own_v4_named_by_task", "own_v6_named_by_task"):
        assert results[label]["status"] == REFUSED, (label, results[label])
        assert own in results[label]["body"], (label, results[label])
    assert results["metadata"]["status"] == REFUSED
    assert "169.254.169.254 is an internal address" in results["metadata"]["body"]
    # What the lender named is reached: the local server, and its own addresses when it says so.
    for label in ("allowed", "own_v4_named_by_lender", "metadata_named_by_lender"):
        assert results[label] == {"status": CONNECTED, "body": "reached"}, (label, results[label])
    assert report["accepted"] == {"127.0.0.1": 1, PUBLIC_V4: 1, PUBLIC_V6: 0, METADATA: 1}
