"""``vmlend image build TASK.toml [--data DIR] [--cache DIR] [--publish] [--json]``.

Prints the image ID and, for each layer (top first), whether it was reused or built; with
``--publish`` also the os, package and image entries it signed into the catalog. When a node is
running on the data dir it holds the chunk store, so the build runs inside it (``image.build``
over the local RPC); otherwise it runs here, booting what ``boot`` locates: catalog does not
import worker_role, so ``node.cli`` hands in the tiny OS's locator.

Exit codes: 0 built, 1 the build failed, 2 the task is wrong (invalid file, unknown OS, a
package that is not in or does not fit the OS's archive, a missing file).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from catalog.blob import BlobStore
from catalog.build.os_tiny import BootFiles
from catalog.build.service import BAD_TASK_ERRORS, INVALID_TASK, build_and_publish
from catalog.chunk_store import ChunkStore
from catalog.service import open_catalog
from catalog.taskfile import load
from node.cli_common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    add_data_option,
    add_json_option,
    data_dir,
    node_client,
    run_command,
)
from node.config import load_config
from node.errors import RpcError, VmlendError
from node.identity import Identity
from node.rpc_blocking_client import NodeNotRunningError

CHUNKS_DIR = "chunks"
"""The chunk store under the data dir, where built blobs go."""

BootLocator = Callable[[], BootFiles]


def add_image_arguments(image: argparse.ArgumentParser, *, boot: BootLocator) -> None:
    """Add ``build`` to the ``image`` command's parser; it sets ``handler(args) -> int``."""
    sub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    build = sub.add_parser(
        "build",
        help="assemble a task's VM image; print its ID and which layers were reused",
    )
    build.add_argument("task", type=Path, metavar="TASK.toml")
    add_data_option(build)
    build.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        default=None,
        help="build cache (default: $VMLEND_BUILD_CACHE or /var/cache/vmlend/build)",
    )
    build.add_argument(
        "--publish", action="store_true", help="sign its os/package/image entries into the catalog"
    )
    add_json_option(build)
    build.set_defaults(handler=functools.partial(cmd_image_build, boot=boot))


def cmd_image_build(args: argparse.Namespace, *, boot: BootLocator) -> int:
    try:
        task_path = args.task.absolute()
        load(task_path)  # bad task files are refused here, before any node is involved
        summary = _build_in_node(args, task_path)
        if summary is None:
            data = data_dir(args)
            summary = trio.run(_build_here, task_path, data, args.cache, args.publish, boot)
    except BAD_TASK_ERRORS as e:
        print(f"vmlend image build: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RpcError as e:
        print(f"vmlend image build: {e.message}", file=sys.stderr)
        return EXIT_USAGE if e.code == INVALID_TASK else EXIT_FAILURE
    except VmlendError as e:
        print(f"vmlend image build: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
    return 0


def _build_in_node(args: argparse.Namespace, task: Path) -> dict[str, Any] | None:
    """The summary from the node running on the data dir, or None when no node runs there."""
    options: dict[str, Any] = {"task": str(task), "publish": args.publish}
    if args.cache is not None:
        options["cache"] = str(args.cache.absolute())
    try:
        # No timeout: a build takes as long as it takes.
        with node_client(args, timeout=None) as client:
            result: dict[str, Any] = client.call("image.build", options)
    except NodeNotRunningError:
        return None
    return result


async def _build_here(
    task: Path, data: Path, cache: Path | None, publish: bool, boot: BootLocator
) -> dict[str, Any]:
    await trio.Path(data).mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(data)
    async with ChunkStore.open(data / CHUNKS_DIR) as store:
        if not publish:
            return await build_and_publish(
                task,
                blobs=BlobStore(store),
                library=None,
                identity=identity,
                boot=boot,
                cache_dir=cache,
                now=time.time(),
            )
        trusted = load_config(data, {}).catalog.trusted_publisher_keys
        async with open_catalog(data, identity, trusted) as catalog:
            return await build_and_publish(
                task,
                blobs=BlobStore(store),
                library=catalog.library,
                identity=identity,
                boot=boot,
                cache_dir=cache,
                now=time.time(),
            )


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"image {summary['image_id']}" + (" (reused)" if summary["reused"] else "")]
    for layer in summary["layers"]:
        state = "reused" if layer["reused"] else "built "
        lines.append(f"  {state} {layer['blob'][:16]}  {layer['what']}")
    for entry in summary.get("published", []):
        what = f"{entry['kind']} {entry['name']} {entry['version']}"
        lines.append(f"  entry  {entry['id'][:16]}  {what}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, boot: BootLocator) -> int:
    parser = argparse.ArgumentParser(prog="vmlend")
    commands = parser.add_subparsers(dest="command", required=True)
    add_image_arguments(commands.add_parser("image"), boot=boot)
    return run_command(parser.parse_args(argv))
