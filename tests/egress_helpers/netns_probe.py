"""Run inside a fresh network namespace (``unshare --net``): give this "host" public addresses
and the cloud metadata address, serve on each, and ask real egress proxies to reach them.

Public addresses cannot be given to the real host (nothing may be routed out), and the
metadata address must not be: in a namespace of its own the process is a host whose own
addresses are public. Prints one JSON object: each attempt's status line and what came back,
and how many connections each server accepted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import trio

from worker_role.egress_proxy import EgressProxy

PUBLIC_V4 = "1.2.3.4"
PUBLIC_V6 = "2001:4860:4860::8888"
METADATA = "169.254.169.254"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


async def attempt(proxy_port: int, authority: str) -> dict[str, str]:
    """CONNECT through the proxy; the status line and everything after the head, to EOF."""
    async with await trio.open_tcp_stream("127.0.0.1", proxy_port) as stream:
        await stream.send_all(f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())
        buffer = b""
        while data := await stream.receive_some(65536):
            buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return {"status": head.split(b"\r\n")[0].decode(), "body": rest.decode(errors="replace")}


async def probe() -> dict[str, object]:
    ip("link", "set", "lo", "up")
    accepted: dict[str, int] = {}
    results: dict[str, dict[str, str]] = {}
    async with trio.open_nursery() as nursery:

        async def serve(host: str, port: int) -> int:
            async def handle(stream: trio.SocketStream) -> None:
                accepted[host] += 1
                await stream.send_all(b"reached")

            accepted[host] = 0
            listeners = await nursery.start(partial(trio.serve_tcp, handle, port, host=host))
            return int(listeners[0].socket.getsockname()[1])

        ok = await serve("127.0.0.1", 0)
        # Started before the host has its public addresses: it must read them again later.
        task = ["*", f"{METADATA}:80", f"127.0.0.1:{ok}"]
        star = EgressProxy(task, 0, lender=["*", f"127.0.0.1:{ok}"])
        star_port = await nursery.start(star.run)
        ip("addr", "add", f"{PUBLIC_V4}/32", "dev", "lo")
        ip("-6", "addr", "add", f"{PUBLIC_V6}/128", "dev", "lo", "nodad")
        ip("addr", "add", f"{METADATA}/32", "dev", "lo")
        v4, v6 = await serve(PUBLIC_V4, 0), await serve(PUBLIC_V6, 0)
        await serve(METADATA, 80)
        task_too = [f"{PUBLIC_V4}:{v4}", f"[{PUBLIC_V6}]:{v6}"]
        star_named_by_task = EgressProxy(["*", *task_too], 0, lender=["*"])
        task_port = await nursery.start(star_named_by_task.run)
        named = EgressProxy(["*"], 0, lender=[f"{PUBLIC_V4}:{v4}", f"{METADATA}:80"])
        named_port = await nursery.start(named.run)
        for label, port, authority in [
            ("own_v4", star_port, f"{PUBLIC_V4}:{v4}"),
            ("own_v6", star_port, f"[{PUBLIC_V6}]:{v6}"),
            ("own_v4_named_by_task", task_port, f"{PUBLIC_V4}:{v4}"),
            ("own_v6_named_by_task", task_port, f"[{PUBLIC_V6}]:{v6}"),
            ("metadata", star_port, f"{METADATA}:80"),
            ("allowed", star_port, f"127.0.0.1:{ok}"),
            ("own_v4_named_by_lender", named_port, f"{PUBLIC_V4}:{v4}"),
            ("metadata_named_by_lender", named_port, f"{METADATA}:80"),
        ]:
            results[label] = await attempt(port, authority)
        nursery.cancel_scope.cancel()
    return {"results": results, "accepted": accepted}


async def main() -> None:
    with trio.fail_after(60):
        report = await probe()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    trio.run(main)
