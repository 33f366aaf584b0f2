"""``vmlend blob add|get|ls|rm|grant|check|gc``: the node's chunk store through its local RPC.

The daemon holds the store; ``blob add`` hands it an absolute path to read (same machine, the
RPC socket is owner-only) and ``blob get -o`` an absolute path to write.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from node.cli_common import (
    EXIT_FAILURE,
    add_data_option,
    add_json_option,
    node_client,
    times_as_rfc3339,
)
from node.rpc import Notification
from node.rpc_blocking_client import Client

ID_HELP = "the blob's ID, or the start of one stored here that no other blob has"


def add_blob_arguments(blob: argparse.ArgumentParser) -> None:
    """Add the ``blob`` command's subcommands to its parser."""
    sub = blob.add_subparsers(dest="blob_command", metavar="SUBCOMMAND", required=True)

    add = sub.add_parser("add", help="store a file as a blob; prints its ID")
    add.add_argument("file", metavar="FILE")
    add.add_argument(
        "--private", action="store_true", help="not announced; served only to granted peers"
    )
    _common(add)
    add.set_defaults(handler=cmd_add)

    get = sub.add_parser("get", help="fetch a blob from its providers (or --from) into a file")
    get.add_argument("blob_id", metavar="ID", help=ID_HELP)
    get.add_argument("-o", "--output", metavar="FILE", required=True)
    get.add_argument(
        "--from", dest="sources", action="append", metavar="MULTIADDR", help="repeatable"
    )
    _common(get, json_help="progress events as JSON lines on stdout")
    get.set_defaults(handler=cmd_get)

    ls = sub.add_parser("ls", help="blobs in the local store")
    _common(ls)
    ls.set_defaults(handler=cmd_ls)

    rm = sub.add_parser("rm", help="forget a blob (its chunks go at the next gc)")
    rm.add_argument("blob_id", metavar="ID", help=ID_HELP)
    _common(rm)
    rm.set_defaults(handler=cmd_rm)

    grant = sub.add_parser("grant", help="let a peer fetch a private blob from this node")
    grant.add_argument("blob_id", metavar="ID", help=ID_HELP)
    grant.add_argument("peer_id", metavar="PEER_ID")
    _common(grant)
    grant.set_defaults(handler=cmd_grant)

    check = sub.add_parser(
        "check", help="verify every chunk on disk; quarantine corrupt ones (exit 1 if any)"
    )
    _common(check)
    check.set_defaults(handler=cmd_check)

    gc = sub.add_parser("gc", help="delete chunks no blob uses")
    _common(gc)
    gc.set_defaults(handler=cmd_gc)


def _common(parser: argparse.ArgumentParser, json_help: str = "print JSON for scripts") -> None:
    add_data_option(parser)
    add_json_option(parser, help=json_help)


def _client(args: argparse.Namespace) -> Client:
    # No overall timeout: adding or fetching a large blob takes as long as it takes.
    return node_client(args, timeout=None)


def _call(args: argparse.Namespace, method: str, *params: Any) -> Any:
    with _client(args) as client:
        return client.call(method, *params)


def _print(args: argparse.Namespace, result: Any, text: str) -> None:
    """``result`` as JSON with ``--json``, else ``text`` for people."""
    print(json.dumps(result) if args.json else text)


def cmd_add(args: argparse.Namespace) -> int:
    path = str(Path(args.file).resolve())
    result = _call(args, "blob.add", path, {"private": bool(args.private)})
    _print(args, result, result["id"])
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"out": str(Path(args.output).resolve())}
    if args.sources:
        options["from"] = list(args.sources)
    bar = _ProgressBar(sys.stderr) if not args.json and sys.stderr.isatty() else None
    with _client(args) as client:
        for item in client.stream("blob.get", args.blob_id, options):
            if isinstance(item, Notification):
                event = dict(item.params[0]) if item.params else {}
                event["event"] = item.method.removeprefix("blob.")
                if args.json:
                    print(json.dumps(event), flush=True)
                elif bar is not None and event["event"] == "progress":
                    bar.show(event)
                elif event["event"] == "peer":
                    print(
                        f"peer {event['peer']} {event['status']}: {event['reason']}",
                        file=sys.stderr,
                    )
            else:
                result = dict(item.value)
                if bar is not None:
                    bar.done()
                if args.json:
                    print(json.dumps({"event": "done", **result}), flush=True)
                else:
                    print(
                        f"{result['id']} -> {result['out']} "
                        f"({result['bytes_fetched']} bytes fetched, "
                        f"{result['bytes_present']} already here, {result['seconds']:.2f}s)"
                    )
    return 0


class _ProgressBar:
    WIDTH = 30

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def show(self, p: dict[str, Any]) -> None:
        total = max(int(p["bytes_total"]), 1)
        done = int(p["bytes_done"])
        filled = self.WIDTH * done // total
        line = (
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {100 * done // total:3d}% "
            f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB "
            f"{p['rate_bps'] / 2**20:.1f} MiB/s {p['peers']} peer(s)"
        )
        self._out.write(line)
        self._out.flush()

    def done(self) -> None:
        self._out.write("\n")
        self._out.flush()


def cmd_ls(args: argparse.Namespace) -> int:
    blobs = _call(args, "blob.ls")
    if args.json:
        print(json.dumps(times_as_rfc3339(blobs)))
        return 0
    print(f"{'ID':64}  {'SIZE':>12}  {'CHUNKS':>7}  STATE")
    for b in blobs:
        state = "complete" if b["complete"] else f"incomplete ({b['missing']} missing)"
        state += ", private" if b.get("private") else ""
        print(f"{b['id']:64}  {b['size']:>12}  {b['chunks']:>7}  {state}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    result = _call(args, "blob.rm", args.blob_id)
    _print(args, result, f"removed {result['id']}")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    result = _call(args, "blob.grant", args.blob_id, args.peer_id)
    _print(args, result, f"granted {result['peer']} {result['id']}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    result = _call(args, "blob.gc")
    _print(args, result, f"freed {result['chunks_freed']} chunks, {result['bytes_freed']} bytes")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    report = _call(args, "blob.check")
    if args.json:
        print(json.dumps(report))
    else:
        for key, what in (
            ("corrupt", "corrupt, quarantined (fetch its blob again)"),
            ("missing_files", "indexed but its file is gone"),
            ("stray_files", "a file the index does not know"),
        ):
            for name in report[key]:
                print(f"{name}: {what}")
        print("chunk store ok" if report["ok"] else "chunk store has problems (listed above)")
    return 0 if report["ok"] else EXIT_FAILURE
