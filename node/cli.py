"""The ``vmlend`` command. ``main(argv) -> int`` so tests can call it in-process.

Exit codes (:mod:`node.cli_common`): 0 success, 1 a failure while doing the work, 2 bad usage or
bad configuration, and for ``vm run`` the guest command's own exit code (124 on timeout).

Here the roles' commands are composed into one command line. A command defined in another module
has its arguments added only once argparse has picked it, so that its module and what that module
imports (the image builder, the VM backend, trio) load only for that command: ``vmlend --version``
and ``vmlend peers`` answer without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import node
from node.cli_common import (
    AddArguments,
    add_data_option,
    add_json_option,
    add_verbosity_option,
    configure_logging,
    data_dir,
    node_client,
    print_table,
    run_command,
)
from node.cli_suggest import SuggestingParser
from node.data_dir import create_data_dir, data_dir_lock
from node.errors import VmlendError
from node.supervise import lone_error

if TYPE_CHECKING:
    from catalog.build.os_tiny import BootFiles
    from node.config import Config

    _SubParsersAction = argparse._SubParsersAction[argparse.ArgumentParser]
else:  # generic only to type checkers
    _SubParsersAction = argparse._SubParsersAction


class _CommandsAddedOnUse(_SubParsersAction):
    """Subcommands whose arguments (and so whose modules) are added only when argparse picks one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, AddArguments] = {}

    def add_command(self, name: str, *, help: str, add_arguments: AddArguments) -> None:
        self.add_parser(name, help=help)
        self._pending[name] = add_arguments

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if isinstance(values, list) and values and values[0] in self._pending:
            self._pending.pop(values[0])(self.choices[values[0]])
        if isinstance(values, list) and values and values[0] in self.choices:
            _verbose_anywhere(self.choices[values[0]])
        super().__call__(parser, namespace, values, option_string)


def _verbose_anywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v`` after the (sub)command too (``vmlend status -v``), as users type it; it adds
    to the count given before the command (see :func:`main`)."""
    if "-v" not in parser._option_string_actions:
        parser.add_argument(
            "-v", "--verbose", action="count", dest="verbose_after", default=argparse.SUPPRESS,
            help="more log output (also before the command)",
        )  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _verbose_anywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="vmlend",
        description="Lend and borrow compute as resource-capped VMs on a peer-to-peer network.",
    )
    parser.add_argument("--version", action="version", version=f"vmlend {node.__version__}")
    add_verbosity_option(parser)
    commands = cast(
        _CommandsAddedOnUse,
        parser.add_subparsers(
            action=_CommandsAddedOnUse, dest="command", metavar="COMMAND", required=True
        ),
    )
    _add_node_commands(commands)
    for name, help, add_arguments in _COMMANDS_OF_OTHER_MODULES:
        commands.add_command(name, help=help, add_arguments=add_arguments)
    return parser


def _add_node_commands(commands: _CommandsAddedOnUse) -> None:
    node_cmd = commands.add_parser("node", help="run or inspect the local node")
    node_sub = node_cmd.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)
    start = node_sub.add_parser("start", help="run the node in the foreground")
    add_data_option(start)
    start.add_argument("--listen", action="append", metavar="MULTIADDR", help="repeatable")
    start.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="repeatable")
    start.add_argument("--roles", metavar="LIST", help="comma-separated: worker,scheduler,owner")
    start.set_defaults(handler=_cmd_node_start)
    info = node_sub.add_parser("info", help="this node's peer ID, addresses, roles, version")
    add_data_option(info)
    add_json_option(info)
    info.set_defaults(handler=_cmd_node_info)

    for name, help, handler in (
        ("peers", "peers this node is connected to", _cmd_peers),
        ("schedulers", "schedulers in the DHT: trusted ones, the default", _cmd_schedulers),
        ("doctor", "check whether this machine can lend compute", _cmd_doctor),
    ):
        command = commands.add_parser(name, help=help)
        add_data_option(command)
        add_json_option(command)
        command.set_defaults(handler=handler)
    version = commands.add_parser("version", help="the versions a bug report needs")
    add_json_option(version)
    version.set_defaults(handler=_cmd_version)
    completion = commands.add_parser(
        "completion", help="print the shell completion script (bash or zsh)",
        description='Load it with: eval "$(vmlend completion bash)" (or zsh), e.g. in ~/.bashrc',
    )  # fmt: skip
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(handler=_cmd_completion)
    man = commands.add_parser(
        "man", help="print the manual page (read it with: vmlend man | man -l -)",
    )  # fmt: skip
    man.set_defaults(handler=_cmd_man)


def _vm_arguments(parser: argparse.ArgumentParser) -> None:
    from worker_role.vm.cli import add_vm_arguments

    add_vm_arguments(parser)


def _catalog_arguments(parser: argparse.ArgumentParser) -> None:
    from catalog.cli import add_catalog_arguments

    add_catalog_arguments(parser)


def _blob_arguments(parser: argparse.ArgumentParser) -> None:
    from catalog.blob_cli import add_blob_arguments

    add_blob_arguments(parser)


def _owner_arguments(command: str) -> AddArguments:
    def add(parser: argparse.ArgumentParser) -> None:
        from owner_role.cli import add_owner_arguments

        add_owner_arguments(command, parser)

    return add


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    from catalog.build.cli import add_image_arguments

    add_image_arguments(parser, boot=_tiny_os_boot_files)


def _tiny_os_boot_files() -> BootFiles:
    # catalog does not import worker_role, so the tiny OS's kernel and initramfs are handed in.
    from worker_role.tinyos import locate

    return locate()


_COMMANDS_OF_OTHER_MODULES: tuple[tuple[str, str, AddArguments], ...] = (
    ("vm", "run commands in capped VMs on this machine", _vm_arguments),
    ("catalog", "the catalog's os/package/image/task entries", _catalog_arguments),
    ("blob", "content-addressed blobs: add, fetch, list, remove", _blob_arguments),
    ("submit", "submit a task file; print its task ID", _owner_arguments("submit")),
    (
        "status",
        "a task's state, or every task this node submitted",
        _owner_arguments("status"),
    ),
    ("logs", "a task's output", _owner_arguments("logs")),
    ("wait", "wait until a task is over; exit 0 if it succeeded", _owner_arguments("wait")),
    (
        "results",
        "fetch a task's result: stdout, stderr, exit_code, out.tar",
        _owner_arguments("results"),
    ),
    ("cancel", "cancel a task (its VMs are stopped)", _owner_arguments("cancel")),
    (
        "run",
        "run CMD in a VM somewhere on the network; exit with its exit code",
        _owner_arguments("run"),
    ),
    ("image", "build VM images from task files", _image_arguments),
)


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
    from node.config import load_config
    from node.p2p_host import check_listen_free, to_multiaddr

    data = data_dir(args)
    config = load_config(data, _start_flags(args))
    if not args.verbose:  # -v on the command line outranks the file, like every other flag
        logging.getLogger().setLevel(config.node.log_level.upper())
    create_data_dir(data)
    with data_dir_lock(data):
        check_listen_free([to_multiaddr(addr) for addr in config.network.listen])
        return _start_node(config, data)


def _start_node(config: Config, data: Path) -> int:
    import trio

    from node.daemon import Node, serve_until_signalled
    from node.identity import Identity

    identity = Identity.load_or_create(data)
    the_node = Node(config, data, identity)

    def announce(addrs: list[str]) -> None:
        print(f"peer id: {the_node.p2p.peer_id}", flush=True)
        for addr in addrs:
            print(f"listening on {addr}", flush=True)
        print(f"roles: {','.join(the_node.roles)}", flush=True)
        print(f"rpc: {data / 'rpc.sock'}", flush=True)

    try:
        trio.run(lambda: serve_until_signalled(the_node, on_started=announce))
    except BaseExceptionGroup as group:
        lone = lone_error(group)
        if not isinstance(lone, VmlendError):
            raise
        raise lone from lone.__cause__  # one line through run_command, not trio's group
    print("stopped", flush=True)
    return 0


def _cmd_node_info(args: argparse.Namespace) -> int:
    info = node_client(args).call("node.info")
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
    peers = node_client(args).call("peers.list")
    if args.json:
        print(json.dumps(peers))
        return 0
    print_table([(p["peer_id"], " ".join(p["addrs"])) for p in peers], ("PEER ID", "ADDRESSES"))
    return 0


def _cmd_schedulers(args: argparse.Namespace) -> int:
    schedulers = node_client(args).call("schedulers.list")
    if args.json:
        print(json.dumps(schedulers))
        return 0
    # TRUSTED: listed in network.trusted_schedulers; DEFAULT: where a task submitted without
    # --scheduler goes (catalog.scheduler_choice), if it can be reached; SEEN: "stale" when
    # this lookup could not reach it and an earlier one's record is shown.
    print_table(
        [
            (
                s["name"],
                s["peer_id"],
                "yes" if s.get("trusted") else "no",
                "yes" if s.get("default") else "",
                "stale" if s.get("stale") else "now",
                " ".join(s["addrs"]),
            )
            for s in schedulers
        ],
        ("NAME", "PEER ID", "TRUSTED", "DEFAULT", "SEEN", "ADDRESSES"),
    )
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from node.doctor import run_doctor
    from worker_role.vm.doctor import vm_checks

    return run_doctor(args.data, vm_checks=vm_checks, as_json=args.json)


def _cmd_version(args: argparse.Namespace) -> int:
    from node.version_report import print_report

    return print_report(args.json)


def _cmd_completion(args: argparse.Namespace) -> int:
    from node.cli_completion import script

    print(script(build_parser(), args.shell), end="")
    return 0


def _cmd_man(args: argparse.Namespace) -> int:
    from node.cli_manpage import manpage

    print(manpage(build_parser(), version=node.__version__), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose += vars(args).pop("verbose_after", 0)
    configure_logging(args.verbose)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
