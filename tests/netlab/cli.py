"""``scripts/netlab``: build a lab topology by hand, run commands in it, tear it down.

    scripts/netlab up two-homes [--delay-ms 20] [--loss 0.01] [--rate-mbit 10] [--count 4]
    scripts/netlab exec own ping-less-command ...   # a host by name, or a router by its home
    scripts/netlab list
    scripts/netlab down [--all]                      # --all: every lab, tests' leftovers too

One hand-built lab at a time, under the prefix ``vlab-cli-`` (or ``$VMLEND_NETLAB_PREFIX``, which
must start with ``vlab-``). Its forwarder keeps running after ``up`` returns, in the lab's switch
namespace, until ``down``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.netlab.lab import CLI_PREFIX, LAB_ROOT, Lab, LabError, down, namespaces
from tests.netlab.topology import NAMES, LinkSpec, TopologyError, named

LOG_DIR = Path("/tmp/vlab-cli")


def _prefix() -> str:
    prefix = os.environ.get("VMLEND_NETLAB_PREFIX", CLI_PREFIX)
    if not prefix.startswith(LAB_ROOT):
        raise LabError(f"VMLEND_NETLAB_PREFIX must start with {LAB_ROOT}")
    return prefix


def _up(args: argparse.Namespace) -> int:
    if namespaces(_prefix()):
        print("a lab is already up; run 'scripts/netlab down' first", file=sys.stderr)
        return 1
    link = LinkSpec(args.delay_ms, args.loss, args.rate_mbit)
    lab = Lab(named(args.topology, link, args.count), _prefix(), LOG_DIR)
    lab.up()
    for host in lab.plan.hosts.values():
        where = f"home {host.home}" if host.home else "public"
        print(f"{host.name:10} {host.ip:15} {where:10} netns {host.netns}")
    for router in lab.plan.routers.values():
        print(f"{router.home:10} {router.wan_ip:15} router     netns {router.netns} ({router.nat})")
    return 0


def _exec(args: argparse.Namespace) -> int:
    prefix = _prefix()
    for candidate in (f"{prefix}{args.node}", f"{prefix}r-{args.node}"):
        if candidate in namespaces(prefix):
            os.execvp("ip", ["ip", "netns", "exec", candidate, *args.cmd])
    print(f"no host or router {args.node!r} in the lab (scripts/netlab list)", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/netlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a topology")
    up.add_argument("topology", choices=NAMES)
    up.add_argument("--delay-ms", type=float, default=0.0, help="one way, on every shaped link")
    up.add_argument("--loss", type=float, default=0.0, help="per frame, each direction")
    up.add_argument("--rate-mbit", type=float, default=None)
    up.add_argument("--count", type=int, default=4, help="hosts of the 'public' topology")
    run = sub.add_parser("exec", help="run a command in a host's or router's namespace")
    run.add_argument("node")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="the lab namespaces that exist")
    dn = sub.add_parser("down", help="tear the lab down")
    dn.add_argument("--all", action="store_true", help=f"every namespace named {LAB_ROOT}*")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the network lab needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    try:
        if args.command == "up":
            return _up(args)
        if args.command == "exec":
            if not args.cmd:
                parser.error("exec needs a command")
            return _exec(args)
        if args.command == "list":
            print("\n".join(namespaces(LAB_ROOT)))
            return 0
        removed = down(LAB_ROOT if args.all else _prefix())
        print(f"removed {len(removed)} namespaces")
        return 0
    except (LabError, TopologyError) as exc:
        print(f"netlab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
