"""The ``vmlend`` command. ``main(argv) -> int`` so tests can call it in-process.

Exit codes: 0 success, 1 a failure while doing the work, 2 bad usage or bad configuration, and for
``vm run`` the guest command's own exit code (124 on timeout).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import node
from node.errors import ConfigError, IdentityError, RpcError, VmlendError

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", metavar="DIR", help="data directory (default: $VMLEND_DATA or the XDG data dir)"
    )


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmlend",
        description="Lend and borrow compute as resource-capped VMs on a peer-to-peer network.",
    )
    parser.add_argument("--version", action="version", version=f"vmlend {node.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    node_cmd = commands.add_parser("node", help="run or inspect the local node")
    node_sub = node_cmd.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)
    start = node_sub.add_parser("start", help="run the node in the foreground")
    _data_arg(start)
    start.add_argument("--listen", action="append", metavar="MULTIADDR", help="repeatable")
    start.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="repeatable")
    start.add_argument("--roles", metavar="LIST", help="comma-separated: worker,scheduler,owner")
    start.set_defaults(handler=_cmd_node_start)
    info = node_sub.add_parser("info", help="this node's peer ID, addresses, roles, version")
    _data_arg(info)
    _json_arg(info)
    info.set_defaults(handler=_cmd_node_info)

    peers = commands.add_parser("peers", help="peers this node is connected to")
    _data_arg(peers)
    _json_arg(peers)
    peers.set_defaults(handler=_cmd_peers)

    schedulers = commands.add_parser("schedulers", help="schedulers found in the DHT")
    _data_arg(schedulers)
    _json_arg(schedulers)
    schedulers.set_defaults(handler=_cmd_schedulers)

    doctor = commands.add_parser("doctor", help="check whether this machine can lend compute")
    _data_arg(doctor)
    _json_arg(doctor)
    doctor.set_defaults(handler=_cmd_doctor)

    from catalog.blob_cli import add_blob_parser
    from catalog.build.cli import add_image_parser
    from catalog.cli import add_catalog_parser
    from scheduler_role.owner_cli import add_owner_parsers
    from worker_role.tinyos import locate
    from worker_role.vm.cli import add_vm_parser

    add_vm_parser(commands)
    add_catalog_parser(commands)
    add_blob_parser(commands)
    add_owner_parsers(commands)
    # catalog must not import worker_role, so the tiny OS's boot files are handed in here.
    add_image_parser(commands, boot=locate)
    return parser


def _start_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Only flags actually given override the files (None means 'not given')."""
    flags: dict[str, Any] = {}
    if args.listen:
        flags["network.listen"] = list(args.listen)
    if args.bootstrap:
        flags["network.bootstrap"] = list(args.bootstrap)
    if args.roles is not None:
        flags["node.roles"] = [r.strip() for r in args.roles.split(",") if r.strip()]
    return flags


def _cmd_node_start(args: argparse.Namespace) -> int:
    import trio

    from node.config import load_config, resolve_data_dir
    from node.daemon import Node, serve_until_signalled
    from node.identity import Identity

    data_dir = resolve_data_dir(args.data)
    config = load_config(data_dir, _start_flags(args))
    if not args.verbose:  # -v on the command line outranks the file, like every other flag
        logging.getLogger().setLevel(config.node.log_level.upper())
    identity = Identity.load_or_create(data_dir)
    the_node = Node(config, data_dir, identity)

    def announce(addrs: list[str]) -> None:
        print(f"peer id: {the_node.p2p.peer_id}", flush=True)
        for addr in addrs:
            print(f"listening on {addr}", flush=True)
        print(f"roles: {','.join(the_node.roles)}", flush=True)
        print(f"rpc: {data_dir / 'rpc.sock'}", flush=True)

    trio.run(lambda: serve_until_signalled(the_node, on_started=announce))
    print("stopped", flush=True)
    return 0


def _client(args: argparse.Namespace) -> Any:
    from node.config import resolve_data_dir
    from node.rpc_client import Client

    return Client(resolve_data_dir(args.data))


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _cmd_node_info(args: argparse.Namespace) -> int:
    info = _client(args).call("node.info")
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"peer id:  {info['peer_id']}")
    if info.get("name"):
        print(f"name:     {info['name']}")
    print(f"version:  {info['version']}")
    print(f"roles:    {', '.join(info['roles'])}")
    for addr in info["addrs"]:
        print(f"address:  {addr}")
    return 0


def _cmd_peers(args: argparse.Namespace) -> int:
    peers = _client(args).call("peers.list")
    if args.json:
        print(json.dumps(peers))
        return 0
    _print_table([(p["peer_id"], " ".join(p["addrs"])) for p in peers], ("PEER ID", "ADDRESSES"))
    return 0


def _cmd_schedulers(args: argparse.Namespace) -> int:
    schedulers = _client(args).call("schedulers.list")
    if args.json:
        print(json.dumps(schedulers))
        return 0
    _print_table(
        [(s["name"], s["peer_id"], " ".join(s["addrs"])) for s in schedulers],
        ("NAME", "PEER ID", "ADDRESSES"),
    )
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from node.doctor import run_doctor

    return run_doctor(args.data, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.verbose < 2:
        # py-libp2p warns on every stream a peer closes early; our adapter reports what matters.
        logging.getLogger("libp2p").setLevel(logging.ERROR)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as e:
        print(f"vmlend: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except IdentityError as e:
        print(f"vmlend: identity error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RpcError as e:
        print(f"vmlend: {e.message} ({e.code})", file=sys.stderr)
        return EXIT_FAILURE
    except VmlendError as e:
        print(f"vmlend: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
