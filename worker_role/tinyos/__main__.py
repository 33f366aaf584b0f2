"""``python -m worker_role.tinyos build [--quiet] [--data-dir DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker_role.errors import TinyOsError
from worker_role.tinyos._build import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker_role.tinyos")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find cached) kernel + initramfs")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        tiny = build(data=args.data_dir, log=None if args.quiet else _log)
    except TinyOsError as e:
        print(f"tinyos: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"tinyos {tiny.ident}: kernel {tiny.kernel} initrd {tiny.initrd}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
