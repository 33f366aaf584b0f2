"""``vmlend image build TASK.toml [--data DIR] [--cache DIR] [--json]``.

Prints the image ID and, for each layer (top first), whether it was reused or built. The lead
wires :func:`add_image_parser` into ``node/cli.py``, handing it the tiny OS's locator (catalog
does not import worker_role)::

    from catalog.build.cli import add_image_parser
    from worker_role.tinyos import locate

    add_image_parser(commands, boot=locate)

Exit codes: 0 built, 1 the build failed, 2 the task is wrong (invalid file, unknown OS, a
package that is not in or does not fit the OS's archive, a missing file).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from catalog.blob import BlobStore
from catalog.build.assemble import AssembledImage, Assembler
from catalog.build.cache import BuildCache
from catalog.build.os_tiny import BootFiles
from catalog.chunk_store import ChunkStore
from catalog.errors import PackageError, TaskFileError, TaskInputError, UnknownOsError
from catalog.taskfile import TaskFile, load
from node.config import resolve_data_dir
from node.errors import VmlendError

CHUNKS_DIR = "chunks"
"""The chunk store under the data dir, where built blobs go."""
EXIT_FAILED = 1
EXIT_BAD_TASK = 2

BootLocator = Callable[[], BootFiles]


def add_image_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], *, boot: BootLocator
) -> None:
    """Add the ``image`` command group; each command sets ``handler(args) -> int``."""
    image = subparsers.add_parser("image", help="build VM images from task files")
    sub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    build = sub.add_parser(
        "build",
        help="assemble a task's VM image; print its ID and which layers were reused",
    )
    build.add_argument("task", type=Path, metavar="TASK.toml")
    build.add_argument(
        "--data", metavar="DIR", help="data directory (default: $VMLEND_DATA or the XDG data dir)"
    )
    build.add_argument("--cache", type=Path, metavar="DIR", default=None,
                       help="build cache (default: $VMLEND_BUILD_CACHE or /var/cache/vmlend/build)")
    build.add_argument("--json", action="store_true", help="print JSON for scripts")
    build.set_defaults(handler=functools.partial(cmd_image_build, boot=boot))


def cmd_image_build(args: argparse.Namespace, *, boot: BootLocator) -> int:
    try:
        task = load(args.task)
        data = resolve_data_dir(args.data)
        image = trio.run(build_image, task, data, args.cache, boot)
    except (TaskFileError, UnknownOsError, PackageError, TaskInputError) as e:
        print(f"vmlend image build: {e}", file=sys.stderr)
        return EXIT_BAD_TASK
    except VmlendError as e:
        print(f"vmlend image build: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(image.summary(), indent=1))
    else:
        print(format_summary(image))
    return 0


async def build_image(
    task: TaskFile, data: Path, cache: Path | None, boot: BootLocator
) -> AssembledImage:
    """Assemble ``task``'s image into the chunk store under ``data``."""
    await trio.Path(data).mkdir(parents=True, exist_ok=True)
    async with ChunkStore.open(data / CHUNKS_DIR) as store:
        assembler = Assembler(BuildCache(cache), BlobStore(store), boot())
        return await assembler.assemble(task)


def format_summary(image: AssembledImage) -> str:
    lines = [f"image {image.image_id}" + (" (reused)" if image.reused else "")]
    for layer in image.summary()["layers"]:
        state = "reused" if layer["reused"] else "built "
        lines.append(f"  {state} {layer['blob'][:16]}  {layer['what']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, boot: BootLocator) -> int:
    parser = argparse.ArgumentParser(prog="vmlend")
    add_image_parser(parser.add_subparsers(dest="command", required=True), boot=boot)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code
