"""A few thousand inputs of bench/fuzz.py's decoder part, so that CI keeps it honest: any crash
(an exception that is not a VmlendError), mistyped error or hang in a decoder fails here."""

from __future__ import annotations

import gc
import random

from bench.fuzzing.decoders import fuzz_target, run
from bench.fuzzing.targets import Target, all_targets
from catalog import dispatch, owner_protocol, replication_messages, transfer_messages
from node import heartbeat
from node.errors import ProtocolError
from node.wire_message import MessageSet

INPUTS = 4000


def test_no_decoder_crashes_or_hangs_on_generated_inputs() -> None:
    results = run(all_targets(), INPUTS, seed=13)
    assert sum(s.inputs for s in results.values()) == INPUTS
    findings = {name: s.report()["findings"] for name, s in results.items() if s.findings}
    assert findings == {}
    # Structure-aware inputs get past the frame checks: some are accepted by every decoder.
    assert all(s.accepted > 0 for s in results.values()), {
        n: s.accepted for n, s in results.items()
    }


def test_every_message_of_every_protocol_is_a_seed() -> None:
    modules = (dispatch, owner_protocol, replication_messages, transfer_messages, heartbeat)
    assert modules  # imported so that their message sets exist
    sets = [obj for obj in gc.get_objects() if isinstance(obj, MessageSet)]
    types = {(s.protocol, kind) for s in sets for kind in s._types}
    seeded = set()
    for target in all_targets():
        for seed in target.seeds:
            for message in seed if isinstance(seed, list) else [seed]:
                if isinstance(message, dict) and isinstance(message.get("type"), str):
                    seeded.add(message["type"])
    assert {kind for _, kind in types} - seeded == set()


def _buggy(data: bytes) -> object:
    if len(data) % 2:
        raise KeyError("addrs")  # what a decoder that indexes a raw map raises
    raise ProtocolError("refused")


def test_a_decoder_that_raises_an_untyped_error_is_reported_with_its_input() -> None:
    count = 200
    target = Target("buggy", [{"type": "x", "a": 1}], _buggy, (ProtocolError,))
    stats = fuzz_target(target, count, random.Random(1), [0])
    assert stats.crashes > 0
    assert stats.rejected + stats.crashes == count
    (finding,) = stats.findings.values()
    assert finding["kind"] == "crash"
    assert finding["error"] == "KeyError: 'addrs'"
    assert finding["input_size"] % 2 == 1
