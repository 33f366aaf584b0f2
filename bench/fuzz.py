"""Fuzz benchmark: generated inputs through every decoder and every protocol handler of a live
node, reporting crashes, hangs, peak memory and inputs per second. Prints one JSON object.

Inputs are structure-aware (valid messages from the real encoders with fields mutated: wrong
types, numbers past their bounds, NaN, long strings, bytes for text, deep nesting, unknown and
missing keys, a sibling message's type, damaged bytes) plus random bytes; see
``bench/fuzzing/mutate.py``.

- decoders (in this process): every typed decoder a peer's bytes reach, on the path the node runs
  (frame limits, typed message, then what the receiver does next without I/O); a crash is an
  exception that is not a VmlendError, a hang an input taking over 1 s of CPU;
- live: a real ``vmlend node start`` with the worker, scheduler and owner roles, fed inputs on
  every protocol it serves (the ones identify lists) from a real py-libp2p host, on its local RPC
  socket and on its chunk data channel, and asked honest requests after every batch of 500; a
  crash is the process ending or an "internal error" in its log, a hang an honest request not
  answered within 15 s.

The baseline, in the same run: the seeds themselves (valid messages) decoded through the same
targets, which gives the decoders' own speed on good input.

    .venv/bin/python bench/fuzz.py [--inputs 1000000] [--live-share 0.02] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.fuzzing.decoders import run as fuzz_decoders
from bench.fuzzing.live import fuzz_live
from bench.fuzzing.targets import Target, all_targets


def baseline(targets: list[Target], rounds: int = 2000) -> float:
    """Valid messages per second through the same decoders (every seed, ``rounds`` times)."""
    encoded = [(t, t.encoder(seed)) for t in targets for seed in t.seeds]
    start, count = time.perf_counter(), 0
    for _ in range(rounds // len(encoded) + 1):
        for target, data in encoded:
            assert data is not None
            with suppress(*target.expected):  # a seed refused on purpose (a pong as a ping)
                target.decode(data)
            count += 1
    return count / (time.perf_counter() - start)


def decoder_report(total: int, seed: int) -> dict[str, Any]:
    targets = all_targets()
    good = baseline(targets)
    start = time.perf_counter()
    results = fuzz_decoders(targets, total, seed)
    seconds = time.perf_counter() - start
    inputs = sum(s.inputs for s in results.values())
    return {
        "targets": len(results),
        "inputs": inputs,
        "crashes": sum(s.crashes for s in results.values()),
        "mistyped_errors": sum(s.mistyped for s in results.values()),
        "hangs": sum(s.hangs for s in results.values()),
        "seconds": round(seconds, 1),
        "inputs_per_s": round(inputs / seconds),
        "baseline_valid_messages_per_s": round(good),
        "fuzzer_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "per_target": {name: s.report() for name, s in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="in total, both parts")
    parser.add_argument("--live-share", type=float, default=0.02, help="of --inputs (0: none)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.inputs < 1 or not 0 <= args.live_share <= 1:
        parser.error("--inputs must be positive and --live-share in [0, 1]")
    live_inputs = round(args.inputs * args.live_share)
    # py-libp2p logs every stream our hostile inputs break, at ERROR, from this process's host.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    load0 = round(psutil.getloadavg()[0], 1)
    report: dict[str, Any] = {
        "bench": "fuzz",
        "host": {"cpus": psutil.cpu_count(), "load_average_1m_at_start": load0},
        "seed": args.seed,
        "inputs_requested": args.inputs,
    }
    report["decoders"] = decoder_report(args.inputs - live_inputs, args.seed)
    if live_inputs:
        print(f"live node: {live_inputs} inputs...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="vmlend-bench-fuzz-") as tmp:
            report["live"] = trio.run(fuzz_live, Path(tmp), live_inputs, args.seed)
    parts = [report["decoders"], *([report["live"]] if live_inputs else [])]
    report["total"] = {
        "inputs": sum(p["inputs"] for p in parts),
        "crashes": sum(p["crashes"] for p in parts),
        "hangs": sum(p["hangs"] for p in parts),
        "fuzzer_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=1))
    return 1 if report["total"]["crashes"] or report["total"]["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
