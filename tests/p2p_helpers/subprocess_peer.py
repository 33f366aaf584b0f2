"""Run ``peer_proc`` as a child process the test owns (killed on exit, whatever happened)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]


class PeerProcess:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.peer_id = ""
        self.addrs: list[str] = []
        self._buffer = b""

    async def read_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(4096)
            if not chunk:
                raise EOFError("peer process closed its stdout")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def wait_event(self, name: str) -> None:
        while await self.read_line() != f"EVENT {name}":
            pass

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@asynccontextmanager
async def peer_process(
    *bootstrap: str,
    publish: str | None = None,
    timings: dict[str, float] | None = None,
    start_timeout: float = 20.0,
    key: Path | None = None,
    listen: str | None = None,
) -> AsyncIterator[PeerProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMLEND_TEST_TIMINGS": json.dumps(timings or {})}
    if key is not None:
        env["VMLEND_TEST_KEY"] = str(key)
    if listen is not None:
        env["VMLEND_TEST_LISTEN"] = listen
    args = ["--publish", publish] if publish else []
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.p2p_helpers.peer_proc", *args, *bootstrap],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    peer = PeerProcess(process)
    try:
        with trio.fail_after(start_timeout):
            hello = json.loads(await peer.read_line())
        peer.peer_id = hello["peer_id"]
        peer.addrs = hello["addrs"]
        yield peer
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGKILL)
            await process.wait()
