"""A hostile owner against a real scheduler on ``/vmlend/tasks/1.0.0``.

Each attack is sent as raw frames (no client-side checks in the way) over a real libp2p stream;
after it, nothing exists outside the scheduler's task directories and the scheduler still serves.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio

from catalog.owner_protocol import PROTOCOL_ID, REPLIES, REQUESTS, Refused, Submit, Submitted
from catalog.task_wire import task_to_wire
from catalog.taskfile import loads
from tests.hostile.conftest import Node, Scheduler


async def ask(peer: Node, scheduler: Scheduler, frame: Any) -> Any:
    with trio.fail_after(20):
        async with await peer.p2p.open_stream(scheduler.p2p.peer_id, PROTOCOL_ID) as stream:
            await stream.send(frame)
            await stream.send_end()
            return REPLIES.decode(await stream.receive())


def task_map(text: str = 'name = "t"\nos = "tiny"\ncommand = "true"\n') -> dict[str, Any]:
    return task_to_wire(loads(text, base_dir=Path("/")))


def submit(task_id: str, task: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "submit", "task_id": task_id, "task": task, "providers": [], **extra}


async def still_serves(peer: Node, scheduler: Scheduler) -> None:
    answer = await ask(peer, scheduler, {"type": "status", "task_id": "no-such-task"})
    assert_refused(answer, "unknown_task")


def assert_refused(answer: Any, code: str) -> None:
    assert isinstance(answer, Refused), answer
    assert answer.code == code, answer


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize(
    "task_id", ["../../../../tmp/owned", "/tmp/owned", "..", "a/../../b", ".hidden", ""]
)
async def test_a_task_id_that_names_a_path_is_refused_before_any_write(
    scheduler_and_peer: tuple[Scheduler, Node], tmp_path: Path, task_id: str
) -> None:
    scheduler, peer = scheduler_and_peer
    before = all_files(tmp_path)
    answer = await ask(peer, scheduler, submit(task_id, task_map()))
    assert_refused(answer, "bad_request")
    assert all_files(tmp_path) - before == set()
    await still_serves(peer, scheduler)


@pytest.mark.parametrize("package", ["/etc/ssh", "../..", "./../../etc", "vendor/../../.."])
async def test_a_remote_task_cannot_name_a_directory_of_the_scheduler(
    scheduler_and_peer: tuple[Scheduler, Node], package: str
) -> None:
    scheduler, peer = scheduler_and_peer
    task = task_map() | {"packages": [package]}
    answer = await ask(peer, scheduler, submit("t-1", task))
    assert_refused(answer, "bad_request")
    assert not (scheduler.home / "tasks" / "t-1").exists()
    await still_serves(peer, scheduler)


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "submit"},
        {"type": "launch_missiles", "task_id": "t"},
        {"type": "status", "task_id": "t", "extra": 1},
        {"type": "wait", "task_id": "t", "timeout": float("nan")},
        {"type": "logs", "task_id": "t", "follow": "yes"},
        {"type": "submit", "task_id": "t", "task": [], "providers": []},
        {"type": "submit", "task_id": "t", "task": {"name": "t"}, "providers": []},
        {"type": "submit", "task_id": "t", "task": task_map(), "providers": ["x"] * 1000},
    ],
)
async def test_malformed_requests_are_refused_and_the_scheduler_serves_on(
    scheduler_and_peer: tuple[Scheduler, Node], frame: dict[str, Any]
) -> None:
    scheduler, peer = scheduler_and_peer
    answer = await ask(peer, scheduler, frame)
    assert_refused(answer, "bad_request")
    await still_serves(peer, scheduler)


def tar_of(entries: list[tuple[str, bytes]], *, compress: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if compress else "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def submit_with_archive(
    peer: Node, scheduler: Scheduler, task_id: str, files: list[str], archive: bytes
) -> Any:
    blob = await peer.blobs.blobs.add_bytes(archive)
    task = task_map() | {"files": files, "cwd": "/task"}
    frame = submit(task_id, task, files_blob=bytes(blob), providers=peer.p2p.addrs)
    return await ask(peer, scheduler, frame)


@pytest.mark.parametrize(
    ("files", "entries", "compress"),
    [
        (["a"], [("a", b"x"), ("../../escape", b"x")], False),  # a path out of the task
        (["a"], [("a", b"x"), ("b", b"not named by the task")], False),
        (["a"], [("a", b"x")], True),  # compressed: never decompressed for a peer
        (["a", "b"], [("a", b"x")], False),  # a named file is missing
    ],
)
async def test_a_files_archive_is_unpacked_only_as_the_task_names_it(
    scheduler_and_peer: tuple[Scheduler, Node],
    tmp_path: Path,
    files: list[str],
    entries: list[tuple[str, bytes]],
    compress: bool,
) -> None:
    scheduler, peer = scheduler_and_peer
    archive = tar_of(entries, compress=compress)
    answer = await submit_with_archive(peer, scheduler, "t-2", files, archive)
    assert_refused(answer, "invalid_task")
    assert not (scheduler.home / "tasks" / "t-2").exists()
    assert not list((scheduler.home / "tasks").glob(".staging-*"))  # nothing left behind
    assert not any(p.name == "escape" for p in all_files(tmp_path))
    await still_serves(peer, scheduler)


async def test_an_accepted_task_and_its_files_are_stored_under_its_own_directory(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, peer = scheduler_and_peer
    archive = tar_of([("a", b"hello")])
    answer = await submit_with_archive(peer, scheduler, "t-3", ["a"], archive)
    assert isinstance(answer, Submitted)
    assert answer.new
    stored = scheduler.home / "tasks" / "t-3"
    assert (stored / "files" / "a").read_bytes() == b"hello"
    assert (stored / "task.msgpack").is_file()
    # The same submit again is idempotent: nothing is fetched or written twice.
    again = await submit_with_archive(peer, scheduler, "t-3", ["a"], archive)
    assert isinstance(again, Submitted)
    assert not again.new


def test_the_owners_messages_round_trip() -> None:
    message = Submit(
        task_id="t-1", task=loads('name="t"\nos="tiny"\ncommand="true"\n'), providers=("/a",)
    )
    decoded = REQUESTS.decode(REQUESTS.encode(message))
    assert isinstance(decoded, Submit)
    assert decoded.task.command == message.task.command


@pytest.mark.parametrize(
    "request_type",
    [
        {"type": "status"},
        {"type": "wait", "timeout": 0.0},
        {"type": "cancel"},
        {"type": "results"},
        {"type": "logs", "follow": False},
    ],
)
async def test_only_the_owner_may_see_or_cancel_its_task(
    scheduler_and_peers: tuple[Scheduler, Node, Node], request_type: dict[str, Any]
) -> None:
    scheduler, owner, stranger = scheduler_and_peers
    answer = await ask(owner, scheduler, submit("mine-1", task_map()))
    assert isinstance(answer, Submitted)
    frame = {**request_type, "task_id": "mine-1"}
    assert_refused(await ask(stranger, scheduler, frame), "unknown_task")  # as if it did not exist
    status = await scheduler.service.queue.status("mine-1")
    assert status.state.value != "cancelled"
    assert not isinstance(await ask(owner, scheduler, frame), Refused)  # its owner may


async def test_an_unknown_os_is_refused_at_submit_not_at_assembly(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    """Issue 18, item 5: the task was accepted with a task ID and failed later in assembly."""
    scheduler, peer = scheduler_and_peer
    text = 'name = "t"\nos = "windows-95"\ncommand = "true"\n'
    answer = await ask(peer, scheduler, submit("t-os", task_map(text)))
    assert_refused(answer, "invalid_task")
    assert "unknown OS 'windows-95'" in answer.message
    assert "tiny" in answer.message
    assert not (scheduler.home / "tasks" / "t-os").exists()
    ok = await ask(peer, scheduler, submit("t-tiny", task_map()))
    assert isinstance(ok, Submitted), ok
