"""The shared field checks of node.wire_fields: every refusal is a LocalProtocolError."""

from __future__ import annotations

from typing import Any

import pytest

from catalog.caps import Caps
from node.errors import LocalProtocolError
from node.wire_fields import check_keys


def test_keys_of_mixed_types_are_refused_not_a_type_error() -> None:
    # msgpack's strict_map_key lets a peer send bytes keys beside str keys; naming the unexpected
    # keys once compared a str with a bytes (found by bench/fuzz.py).
    raw: dict[Any, Any] = {"vcpus": 1, b"\xff": 2, "zz": 3}
    with pytest.raises(LocalProtocolError, match="unexpected"):
        check_keys("caps", raw, {"vcpus"}, frozenset())


def test_caps_from_wire_with_a_bytes_key_is_refused() -> None:
    raw: dict[Any, Any] = {**Caps().to_wire(), b"": 0, "extra": 1}
    with pytest.raises(LocalProtocolError):
        Caps.from_wire(raw)
