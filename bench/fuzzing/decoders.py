"""The in-process half of the fuzz benchmark: generated inputs through every decoder target.

A *crash* is an exception that is not one of vmlend's typed errors (:class:`VmlendError`); a
typed error that is not the one the decoder documents is counted apart (``mistyped``). A *hang*
is an input that took more than ``HANG_CPU_S`` of CPU; one that runs for ``STUCK_S`` of wall time
is interrupted by a watchdog thread (and counted as a hang too), so a real infinite loop cannot
stop the run. Every crash is kept with the input that caused it (hex), one per distinct place.
"""

from __future__ import annotations

import _thread
import logging
import random
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from node.errors import VmlendError

from .mutate import Mutator
from .targets import Target

HANG_CPU_S = 1.0
STUCK_S = 20.0
MAX_KEPT = 8  # reproducers kept per target
MAX_HEX = 16 * 1024  # bytes of a reproducer shown (its size is given too)
RANDOM_SHARE = 0.15
DAMAGE_SHARE = 0.1


class _Stuck(BaseException):
    """Raised into the main thread by the watchdog (as KeyboardInterrupt, then renamed)."""


@dataclass
class TargetStats:
    name: str
    inputs: int = 0
    random_inputs: int = 0
    rejected: int = 0  # refused with the documented typed error
    accepted: int = 0
    skipped: int = 0  # mutations that msgpack could not encode
    crashes: int = 0
    mistyped: int = 0
    hangs: int = 0
    seconds: float = 0.0
    max_input_ms: float = 0.0
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "random_bytes_inputs": self.random_inputs,
            "accepted": self.accepted,
            "rejected_typed": self.rejected,
            "unencodable_mutations_skipped": self.skipped,
            "crashes": self.crashes,
            "mistyped_errors": self.mistyped,
            "hangs": self.hangs,
            "inputs_per_s": round(self.inputs / self.seconds) if self.seconds else 0,
            "slowest_input_ms": round(self.max_input_ms, 2),
            "findings": list(self.findings.values()),
        }


@contextmanager
def watchdog(progress: list[int]) -> Iterator[None]:
    """Interrupt the main thread if ``progress[0]`` stays the same for ``STUCK_S`` seconds."""
    done = threading.Event()

    def watch() -> None:
        last, since = progress[0], time.monotonic()
        while not done.wait(0.5):
            if progress[0] != last:
                last, since = progress[0], time.monotonic()
            elif time.monotonic() - since > STUCK_S:
                _thread.interrupt_main()
                since = time.monotonic()

    thread = threading.Thread(target=watch, name="fuzz-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def fuzz_target(target: Target, count: int, rng: random.Random, progress: list[int]) -> TargetStats:
    stats = TargetStats(target.name)
    mutator = Mutator(rng)
    started = time.perf_counter()
    while stats.inputs < count:
        data = _input(target, mutator, stats)
        if data is None:
            continue
        stats.inputs += 1
        progress[0] += 1
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        try:
            target.decode(data)
            stats.accepted += 1
        except KeyboardInterrupt:
            _record(stats, "hang", data, f"still running after {STUCK_S} s", None)
        except target.expected:
            stats.rejected += 1
        except VmlendError as e:
            _record(stats, "mistyped", data, f"{type(e).__name__}: {e}", e)
        except Exception as e:
            _record(stats, "crash", data, f"{type(e).__name__}: {e}", e)
        cpu = time.thread_time() - cpu0
        stats.max_input_ms = max(stats.max_input_ms, (time.perf_counter() - wall0) * 1000)
        if cpu > HANG_CPU_S:
            _record(stats, "hang", data, f"{cpu:.2f} s of CPU for one input", None)
    stats.seconds = time.perf_counter() - started
    return stats


def _input(target: Target, mutator: Mutator, stats: TargetStats) -> bytes | None:
    rng = mutator.rng
    if target.random_bytes and rng.random() < RANDOM_SHARE:
        stats.random_inputs += 1
        return mutator.random_bytes()
    tree = mutator.mutate(rng.choice(target.seeds), target.types)
    data = target.encoder(tree)
    if data is None:
        stats.skipped += 1
        return None
    return mutator.damage(data) if rng.random() < DAMAGE_SHARE else data


def _record(
    stats: TargetStats, kind: str, data: bytes, what: str, error: BaseException | None
) -> None:
    if kind == "crash":
        stats.crashes += 1
    elif kind == "mistyped":
        stats.mistyped += 1
    else:
        stats.hangs += 1
    where = ""
    if error is not None:
        frames = traceback.extract_tb(error.__traceback__)
        if frames:
            where = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}"
    key = f"{kind} {type(error).__name__ if error else ''} {where}"
    if key in stats.findings:
        stats.findings[key]["count"] += 1
    elif len(stats.findings) < MAX_KEPT:
        stats.findings[key] = {
            "kind": kind, "at": where, "error": what[:300], "count": 1,
            "input_hex": data[:MAX_HEX].hex(), "input_size": len(data),
        }  # fmt: skip


def run(targets: list[Target], total: int, seed: int) -> dict[str, TargetStats]:
    """``total`` inputs shared evenly among ``targets``; each target has its own seeded stream."""
    progress = [0]
    share, extra = divmod(total, len(targets))
    results: dict[str, TargetStats] = {}
    # The decoders' own warnings about misbehaving peers (one per bad record) are the expected
    # outcome here, a million times over; internal errors still get through.
    logging.disable(logging.WARNING)
    with watchdog(progress):
        for i, target in enumerate(targets):
            rng = random.Random(f"{seed}/{target.name}")
            results[target.name] = fuzz_target(target, share + (i < extra), rng, progress)
    logging.disable(logging.NOTSET)
    return results
