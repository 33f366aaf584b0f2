"""Suite-wide rules: a bug that a service contained (logged as an internal error) fails the test
during which it was logged, so containment never hides a bug."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from node.supervise import INTERNAL_ERROR


class _InternalErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(INTERNAL_ERROR):
            self.records.append(record)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "internal_errors_expected: the test provokes a contained bug on purpose"
    )


@pytest.fixture(autouse=True)
def _no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    handler = _InternalErrors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    if handler.records and not request.node.get_closest_marker("internal_errors_expected"):
        lines = "\n".join(handler.format(r) for r in handler.records[:3])
        pytest.fail(f"a contained bug was logged during this test:\n{lines}")
