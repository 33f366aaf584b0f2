"""What the command line shows people (issue 18, item 9): one timestamp format, RFC 3339 in UTC,
in log lines too; sizes in IEC units with few digits."""

from __future__ import annotations

import logging
import re

import pytest

from node.cli_common import _rfc3339_formatter, rfc3339
from node.units import human_size


def test_log_lines_are_stamped_in_rfc3339_utc() -> None:
    record = logging.LogRecord("vmlend.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.created = 1_796_620_000.25  # 2026-12-07T...
    record.msecs = 250.0
    line = _rfc3339_formatter().format(record)
    assert line == f"{rfc3339(record.created)[:-1]}.250Z vmlend.x WARNING hello you"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z .*", line)


def test_rfc3339_is_utc() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1_796_620_000) == "2026-12-07T05:06:40Z"


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (256 << 20, "256 MiB"),
        (24105 << 20, "23.5 GiB"),
        (99 * 10**12, "90 TiB"),  # "99TB": the "94413758 MiB" of the issue
    ],
)
def test_sizes_for_people(size: int, shown: str) -> None:
    assert human_size(size) == shown


def test_json_shows_every_time_as_rfc3339_at_any_depth() -> None:
    from node.cli_common import times_as_rfc3339

    doc = {
        "submitted_at": 1796664703.5,
        "replicas": [{"finished_at": 1796664710, "exit_code": 0}],
        "running_since": None,
        "size": 12,
        "created_at": True,  # not a time: left as it is
    }
    assert times_as_rfc3339(doc) == {
        "submitted_at": "2026-12-07T17:31:43Z",
        "replicas": [{"finished_at": "2026-12-07T17:31:50Z", "exit_code": 0}],
        "running_since": None,
        "size": 12,
        "created_at": True,
    }


def test_the_waiting_line_shows_how_much_of_the_image_a_worker_has() -> None:
    from owner_role.cli_watch import waiting_line

    replica = {"index": 0, "state": "leased", "worker": "12D3KooWx", "attempts": 1}
    status = {"task_id": "t-1", "state": "active", "replicas": [replica]}
    assert waiting_line(status) == "t-1: booting on 12D3KooWx"
    replica["fetched"] = 12 << 20
    assert waiting_line(status) == "t-1: preparing on 12D3KooWx: 12.0 MiB of its image here"
    replica["state"] = "running"
    assert waiting_line(status) == "t-1: running on 12D3KooWx"
