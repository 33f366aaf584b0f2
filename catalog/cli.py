"""``vmlend catalog ls|show|publish``: thin clients of the node's ``catalog.*`` RPC methods.

:func:`add_catalog_arguments` fills the ``catalog`` command's parser (``node.cli`` calls it only
when that command runs). Each subcommand sets ``handler(args) -> int``; errors (RpcError,
NodeNotRunningError) propagate to ``node.cli_common.run_command``, which prints them and picks the
exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from catalog.entries import KINDS
from node.cli_common import (
    EXIT_USAGE,
    add_data_option,
    add_json_option,
    node_client,
    print_table,
    rfc3339,
    times_as_rfc3339,
)


def add_catalog_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``catalog`` (with ``ls``, ``show``, ``publish``) to an ``add_subparsers()`` object."""
    catalog = subparsers.add_parser("catalog")
    add_catalog_arguments(catalog)
    return catalog


def add_catalog_arguments(catalog: argparse.ArgumentParser) -> None:
    """Add ``ls``, ``show`` and ``publish`` to the ``catalog`` command's parser."""
    sub = catalog.add_subparsers(dest="catalog_command", metavar="SUBCOMMAND", required=True)

    ls = sub.add_parser("ls", help="list entries")
    ls.add_argument("--kind", choices=KINDS, help="only entries of this kind")
    _common(ls)
    ls.set_defaults(handler=cmd_ls)

    show = sub.add_parser("show", help="one entry, by NAME, NAME@VERSION, ID or ID prefix")
    show.add_argument("ref", metavar="NAME|ID")
    show.add_argument("--kind", choices=KINDS, help="when a name is used by several kinds")
    _common(show)
    show.set_defaults(handler=cmd_show)

    publish = sub.add_parser(
        "publish",
        help="sign an entry with this node's key and add it (or add an entry signed elsewhere)",
    )
    publish.add_argument("kind", nargs="?", choices=KINDS, help="the entry's kind")
    publish.add_argument("--name", help="lowercase: letters, digits, . + _ -")
    publish.add_argument("--version", help="free-form, e.g. 12.5 or 3.11.2-1+b1")
    publish.add_argument(
        "--blob", action="append", default=[], metavar="ROLE=BLOB_ID", help="repeatable"
    )
    publish.add_argument(
        "--meta", action="append", default=[], metavar="KEY=JSON", help="repeatable"
    )
    publish.add_argument("--entry", metavar="FILE", help="an already signed entry's bytes")
    _common(publish)
    publish.set_defaults(handler=cmd_publish)


def _common(parser: argparse.ArgumentParser) -> None:
    add_data_option(parser)
    add_json_option(parser)


def _call(args: argparse.Namespace, method: str, *params: Any) -> Any:
    with node_client(args) as client:
        return client.call(method, *params)


def _json(value: Any) -> str:
    return json.dumps(
        times_as_rfc3339(value), default=lambda v: v.hex() if isinstance(v, bytes) else str(v)
    )


def _when(created_at: int) -> str:
    return rfc3339(created_at)


def cmd_ls(args: argparse.Namespace) -> int:
    entries = _call(args, "catalog.list", {"kind": args.kind} if args.kind else {})
    if args.json:
        print(_json(entries))
        return 0
    header = ("KIND", "NAME", "VERSION", "ID", "PUBLISHER", "CREATED")
    rows = [
        (
            e["kind"],
            e["name"],
            e["version"],
            e["id"][:16],
            e["publisher"][:16],
            _when(e["created_at"]),
        )
        for e in entries
    ]
    print_table(rows, header)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    entry = _call(args, "catalog.show", args.ref, {"kind": args.kind} if args.kind else {})
    if args.json:
        print(_json(entry))
        return 0
    for key in ("id", "kind", "name", "version", "publisher"):
        print(f"{key + ':':<11}{entry[key]}")
    print(f"{'created:':<11}{_when(entry['created_at'])}")
    for role, blob_id in sorted(entry["blobs"].items()):
        print(f"{'blob:':<11}{role} {blob_id}")
    for key, value in sorted(entry["meta"].items()):
        print(f"{'meta:':<11}{key} = {_json(value)}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        request = _publish_request(args)
    except ValueError as e:
        print(f"vmlend catalog publish: {e}", file=sys.stderr)
        return EXIT_USAGE
    reply = _call(args, "catalog.publish", request)
    if args.json:
        print(_json(reply))
    else:
        print(f"{reply['id']} ({'published' if reply['new'] else 'already in the catalog'})")
    return 0


def _publish_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.entry is not None:
        if args.kind or args.name or args.version or args.blob or args.meta:
            raise ValueError("--entry takes no other fields: they are inside the signed entry")
        try:
            return {"entry": Path(args.entry).read_bytes()}
        except OSError as e:
            raise ValueError(f"cannot read {args.entry}: {e.strerror}") from e
    if not (args.kind and args.name and args.version):
        raise ValueError("give KIND, --name and --version (or --entry FILE)")
    return {
        "kind": args.kind,
        "name": args.name,
        "version": args.version,
        "blobs": _pairs(args.blob, "--blob", json_values=False),
        "meta": _pairs(args.meta, "--meta", json_values=True),
    }


def _pairs(items: list[str], flag: str, *, json_values: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} wants KEY=VALUE, got {item!r}")
        if key in out:
            raise ValueError(f"{flag} {key} given twice")
        if json_values:
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{flag} {key}: not JSON ({e.msg}); quote strings") from e
        else:
            out[key] = value.strip().lower()
    return out
