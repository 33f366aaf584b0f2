"""Moving counted bytes from a real socket into a real file with splice, and hashing files."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.chunking import hash_chunk
from catalog.errors import SpoolWriteError
from catalog.splice import Splicer, hash_file
from node.errors import StreamBrokenError
from tests.catalog.conftest import random_bytes


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours, theirs


@pytest.fixture
def splicer() -> Iterator[Splicer]:
    pipe = Splicer()
    yield pipe
    pipe.close()


def send_later(sock: socket.socket, data: bytes, *, close: bool = False) -> threading.Thread:
    def send() -> None:
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_moves_exactly_the_counted_bytes_and_leaves_the_rest(
    pair: tuple[socket.socket, socket.socket], splicer: Splicer, tmp_path: Path
) -> None:
    ours, theirs = pair
    first, second = random_bytes(3 << 20, 1), random_bytes(1000, 2)  # bigger than the pipe
    sender = send_later(theirs, first + second)
    with (tmp_path / "a").open("w+b") as a, (tmp_path / "b").open("w+b") as b:
        splicer.move(ours.fileno(), a.fileno(), len(first), idle=lambda: None)
        splicer.move(ours.fileno(), b.fileno(), len(second), idle=lambda: None)
        assert hash_file(a.fileno(), len(first)) == hash_chunk(first)
    sender.join()
    assert (tmp_path / "a").read_bytes() == first
    assert (tmp_path / "b").read_bytes() == second


def test_eof_before_the_count_is_a_broken_stream(
    pair: tuple[socket.socket, socket.socket], splicer: Splicer, tmp_path: Path
) -> None:
    ours, theirs = pair
    send_later(theirs, b"x" * 1000, close=True).join()
    with (tmp_path / "a").open("w+b") as a, pytest.raises(StreamBrokenError, match="EOF after"):
        splicer.move(ours.fileno(), a.fileno(), 5000, idle=lambda: None)


def test_a_file_that_cannot_be_written_gives_back_what_left_the_socket(
    pair: tuple[socket.socket, socket.socket], splicer: Splicer, tmp_path: Path
) -> None:
    ours, theirs = pair
    data = random_bytes(100_000, 3)
    (tmp_path / "ro").write_bytes(b"")
    sender = send_later(theirs, data)
    read_only = os.open(tmp_path / "ro", os.O_RDONLY)  # splicing into it fails (EBADF)
    try:
        with pytest.raises(SpoolWriteError) as caught:
            splicer.move(ours.fileno(), read_only, len(data), idle=lambda: None)
    finally:
        os.close(read_only)
    error = caught.value
    rest = ours.recv(error.remaining, socket.MSG_WAITALL) if error.remaining else b""
    assert error.salvaged + rest == data  # nothing lost, the pipe left empty
    sender.join()
    with (tmp_path / "again").open("w+b") as again:  # and the splicer still works
        send_later(theirs, b"more").join()
        splicer.move(ours.fileno(), again.fileno(), 4, idle=lambda: None)
    assert (tmp_path / "again").read_bytes() == b"more"


def test_a_quiet_socket_calls_idle_which_may_stop_the_move(
    pair: tuple[socket.socket, socket.socket], splicer: Splicer, tmp_path: Path
) -> None:
    ours, _ = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 10_000))
    calls = []

    def idle() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands for trio's Cancelled

    with (tmp_path / "a").open("w+b") as a, pytest.raises(KeyboardInterrupt):
        splicer.move(ours.fileno(), a.fileno(), 10, idle=idle)
    assert len(calls) == 3


def test_hash_file_hashes_the_counted_prefix(tmp_path: Path) -> None:
    data = random_bytes(300_000, 4)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hash_file(fd, len(data)) == hash_chunk(data)
        assert hash_file(fd, 1000) == hash_chunk(data[:1000])
        assert hash_file(fd, 0) == hash_chunk(b"")
    finally:
        os.close(fd)


def test_hash_file_reads_when_the_file_cannot_be_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_mapping(*args: object, **kwargs: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    data = random_bytes(3 << 20, 5)  # several pieces
    path = tmp_path / "f"
    path.write_bytes(data)
    monkeypatch.setattr("catalog.splice.mmap.mmap", no_mapping)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hash_file(fd, len(data)) == hash_chunk(data)
    finally:
        os.close(fd)
