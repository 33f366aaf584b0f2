"""node.rpc, sans-IO: a client and a server protocol object wired back to back, no sockets."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import rpc
from node.errors import LocalProtocolError

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
params_st = st.lists(values, max_size=5)
cuts_st = st.lists(st.integers(0, 5000), max_size=8)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def _events(conn: Any, chunks: list[bytes]) -> list[Any]:
    out = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not None:
            out.append(event)
    return out


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


@given(st.text(max_size=30), params_st, values, cuts_st, cuts_st)
def test_request_response_round_trip(
    method: str, params: list[Any], result: Any, cuts1: list[int], cuts2: list[int]
) -> None:
    client, server = rpc.ClientConnection(), rpc.ServerConnection()
    msgid, data = client.send_request(method, params)
    assert _events(server, _split(data, cuts1)) == [rpc.Request(msgid, method, params)]
    assert server.in_flight == {msgid}
    reply = server.send_response(msgid, None, result)
    assert _events(client, _split(reply, cuts2)) == [rpc.Response(msgid, None, result)]
    assert not server.in_flight


@given(st.lists(st.tuples(st.text(max_size=10), params_st), min_size=1, max_size=6), cuts_st)
def test_pipelined_requests_arrive_in_order(
    calls: list[tuple[str, list[Any]]], cuts: list[int]
) -> None:
    client, server = rpc.ClientConnection(), rpc.ServerConnection()
    sent = [client.send_request(m, p) for m, p in calls]
    data = b"".join(d for _, d in sent)
    got = _events(server, _split(data, cuts))
    assert got == [rpc.Request(i, m, p) for (i, _), (m, p) in zip(sent, calls, strict=True)]
    assert len({i for i, _ in sent}) == len(sent)


def test_error_response_drops_the_result() -> None:
    client, server = rpc.ClientConnection(), rpc.ServerConnection()
    msgid, data = client.send_request("x", [])
    _events(server, [data])
    reply = server.send_response(msgid, rpc.error_object("nope", "why"), "ignored")
    assert _events(client, [reply]) == [
        rpc.Response(msgid, {"code": "nope", "message": "why"}, None)
    ]


@given(params_st, cuts_st)
def test_stream_notifications_carry_their_call(params: list[Any], cuts: list[int]) -> None:
    client, server = rpc.ClientConnection(), rpc.ServerConnection()
    m1, d1 = client.send_request("logs", [])
    m2, d2 = client.send_request("logs", [])
    _events(server, [d1 + d2])
    data = (
        server.send_stream_notification(m2, "line", params)
        + server.send_stream_notification(m1, "line", params)
        + server.send_notification("hello", ["hi"])
        + server.send_response(m1, None, 1)
    )
    assert _events(client, _split(data, cuts)) == [
        rpc.Notification("line", params, m2),
        rpc.Notification("line", params, m1),
        rpc.Notification("hello", ["hi"], None),
        rpc.Response(m1, None, 1),
    ]


def test_client_notification_reaches_server() -> None:
    client, server = rpc.ClientConnection(), rpc.ServerConnection()
    assert _events(server, [client.send_notification("ping", [1])]) == [
        rpc.Notification("ping", [1])
    ]


def test_abandoned_call_late_answers_are_dropped() -> None:
    client, server = rpc.ClientConnection(), rpc.ServerConnection()
    msgid, data = client.send_request("slow", [])
    _events(server, [data])
    cancel = client.abandon(msgid)
    assert _events(server, [cancel]) == [rpc.Notification(rpc.CANCEL_METHOD, [msgid])]
    late = server.send_stream_notification(msgid, "progress", [1]) + server.send_response(
        msgid, rpc.error_object(rpc.CANCELLED, ""), None
    )
    assert _events(client, [late]) == []
    # Once the late response came, the msgid is unknown again.
    with pytest.raises(rpc.BadMsgidError):
        _events(client, [_pack([1, msgid, None, 1])])


def test_msgids_wrap_and_skip_those_in_use() -> None:
    client = rpc.ClientConnection()
    client._next_msgid = rpc.MAX_MSGID
    first, _ = client.send_request("a", [])
    second, _ = client.send_request("b", [])
    assert (first, second) == (rpc.MAX_MSGID, 0)
    client._next_msgid = rpc.MAX_MSGID
    assert client.send_request("c", [])[0] == 1


@pytest.mark.parametrize(
    ("obj", "error", "msgid"),
    [
        ({"a": 1}, rpc.BadShapeError, None),
        ([], rpc.BadShapeError, None),
        ("text", rpc.BadShapeError, None),
        ([0, 7, "m"], rpc.BadShapeError, 7),
        ([0, 7, "m", [], "extra"], rpc.BadShapeError, 7),
        ([0, -1, "m", []], rpc.BadMsgidError, None),
        ([0, 2**32, "m", []], rpc.BadMsgidError, None),
        ([0, "7", "m", []], rpc.BadMsgidError, None),
        ([0, True, "m", []], rpc.BadMsgidError, None),
        ([0, 1.0, "m", []], rpc.BadMsgidError, None),
        ([0, 7, 5, []], rpc.BadTypeError, 7),
        ([0, 7, b"\xff", []], rpc.BadTypeError, 7),  # a bin method must be UTF-8
        ([0, 7, "m", {"k": 1}], rpc.BadTypeError, 7),
        ([0, 7, "m", None], rpc.BadTypeError, 7),
        ([2, "m"], rpc.BadShapeError, None),
        ([2, 5, []], rpc.UnusableNotificationError, None),
        ([2, "m", "p"], rpc.UnusableNotificationError, None),
        ([1, 7, None, 1], rpc.UnknownKindError, None),
        ([3, 7, "m", []], rpc.UnknownKindError, None),
        ([True, 7, "m", []], rpc.UnknownKindError, None),
        (["0", 7, "m", []], rpc.UnknownKindError, None),
    ],
)
def test_server_rejects_malformed_messages(obj: Any, error: type[Exception], msgid: Any) -> None:
    server = rpc.ServerConnection()
    server.receive_data(_pack(obj) + _pack([0, 99, "ok", []]))
    with pytest.raises(error) as info:
        server.next_event()
    assert isinstance(info.value, rpc.RejectedMessageError)
    assert info.value.msgid == msgid
    if msgid is not None:
        reply = server.send_rejection(info.value)
        client = rpc.ClientConnection()
        client._waiting.add(msgid)
        (response,) = _events(client, [reply])
        assert response.error["code"] == rpc.INVALID_REQUEST
    # The stream is still in sync: the next request decodes.
    assert server.next_event() == rpc.Request(99, "ok", [])


def test_duplicate_msgid_in_flight_is_refused_without_answer() -> None:
    server = rpc.ServerConnection()
    server.receive_data(_pack([0, 1, "a", []]) * 2)
    server.next_event()
    with pytest.raises(rpc.BadMsgidError) as info:
        server.next_event()
    assert info.value.msgid is None
    # After the first is answered, the msgid may be used again.
    server.send_response(1, None, None)
    server.receive_data(_pack([0, 1, "a", []]))
    assert server.next_event() == rpc.Request(1, "a", [])


def test_requests_beyond_in_flight_limit_are_busy() -> None:
    server = rpc.ServerConnection(rpc.RpcLimits(max_in_flight=2))
    server.receive_data(b"".join(_pack([0, i, "m", []]) for i in range(3)))
    server.next_event()
    server.next_event()
    with pytest.raises(rpc.BusyError) as info:
        server.next_event()
    assert (info.value.msgid, info.value.code) == (2, rpc.BUSY)
    server.send_response(0, None, None)
    server.receive_data(_pack([0, 2, "m", []]))
    assert server.next_event() == rpc.Request(2, "m", [])


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # reserved byte
        _pack([0, 1, "m", [msgpack.ExtType(1, b"x")]]),
        b"\x94\x00\x01\xa1m\x91\xd6\xff\x00\x00\x00\x00",  # a timestamp ext in params
        b"\x94\x00\x01\xa1m\x91\xa2\xff\xfe",  # invalid UTF-8
        _pack({1: 2}),  # non-str map key
        _pack([0, 1, "m", ["s" * 200]]),  # over max_str
        _pack([0, 1, "m", [b"b" * 200]]),  # over max_bin
        _pack([0, 1, "m", list(range(40))]),  # over max_items
        _pack([0, 1, "m", [[[[[[[[[1]]]]]]]]]]),  # over max_depth
        b"\x91" * 5000,  # past msgpack's own stack
    ],
)
def test_corrupt_stream_poisons_the_connection(data: bytes) -> None:
    limits = rpc.RpcLimits(
        max_message_size=1000, max_str=100, max_bin=100, max_items=32, max_depth=6
    )
    server = rpc.ServerConnection(limits)
    server.receive_data(data)
    with pytest.raises(rpc.StreamCorruptError):
        server.next_event()
    with pytest.raises(rpc.StreamCorruptError):
        server.receive_data(_pack([0, 1, "m", []]))
    with pytest.raises(rpc.StreamCorruptError):
        server.next_event()


def test_oversized_message_is_refused_before_it_is_buffered() -> None:
    limits = rpc.RpcLimits(max_message_size=1000)
    server = rpc.ServerConnection(limits)
    # The header promises 100 kB; the connection fails once 1000 bytes are held, not later.
    server.receive_data(b"\x94\x00\x01\xa1m\x91\xda\xff\xff" + b"x" * 999)
    with pytest.raises(rpc.StreamCorruptError, match="exceeds 1000"):
        server.next_event()


def test_message_made_of_many_small_parts_is_still_bounded() -> None:
    # Each string fits easily; together they exceed the per-message limit.
    server = rpc.ServerConnection(rpc.RpcLimits(max_message_size=1000))
    server.receive_data(_pack([0, 1, "m", ["y" * 90] * 20]))
    with pytest.raises(rpc.StreamCorruptError, match="exceeds 1000"):
        server.next_event()


def test_message_exactly_at_the_limit_passes_among_many() -> None:
    big = [0, 1, "m", ["x" * 100]]
    size = len(_pack(big))
    limits = rpc.RpcLimits(max_message_size=size)
    server = rpc.ServerConnection(limits)
    small = b"".join(_pack([0, i, "m", []]) for i in range(2, 2000))
    # Much more than max_message_size arrives at once; each message alone fits.
    server.receive_data(small + _pack(big))
    events = []
    while (event := server.next_event()) is not None:
        assert isinstance(event, rpc.Request)
        events.append(event)
        server.send_response(event.msgid, None, None)
    assert len(events) == 1999
    assert events[-1] == rpc.Request(1, "m", ["x" * 100])


@given(st.binary(max_size=500))
def test_random_bytes_never_crash_either_side(data: bytes) -> None:
    for conn in (rpc.ServerConnection(), rpc.ClientConnection()):
        with contextlib.suppress(rpc.RejectedMessageError, rpc.StreamCorruptError):
            _events(conn, [data])


@given(values)
def test_any_msgpack_object_is_an_event_or_a_typed_rejection(obj: Any) -> None:
    server = rpc.ServerConnection()
    server.receive_data(_pack(obj))
    try:
        event = server.next_event()
    except rpc.RejectedMessageError as e:
        if e.msgid is not None:
            server.send_rejection(e)
    else:
        assert isinstance(event, rpc.Request | rpc.Notification)


shaped = st.lists(
    st.one_of(
        st.integers(-2, 2**32 + 1),
        st.text(max_size=5),
        st.lists(scalars, max_size=3),
        st.dictionaries(st.text(max_size=3), scalars, max_size=2),
        scalars,
    ),
    max_size=5,
).map(lambda items: items and [items[0] if isinstance(items[0], int) else 0, *items[1:]])


@given(shaped)
def test_message_shaped_arrays_are_checked_field_by_field(obj: Any) -> None:
    server = rpc.ServerConnection()
    server.receive_data(_pack(obj))
    try:
        event = server.next_event()
    except rpc.RejectedMessageError as e:
        rejected: rpc.RejectedMessageError = e
    else:
        _check_event(obj, event)
        return
    if rejected.msgid is not None:
        assert obj[0] == rpc.REQUEST
        assert rejected.msgid == obj[1]
        server.send_rejection(rejected)


def _check_event(obj: Any, event: Any) -> None:
    if isinstance(event, rpc.Request):
        assert obj[0] == rpc.REQUEST
        assert [event.msgid, event.method, event.params] == obj[1:]
        assert type(event.msgid) is int
        assert 0 <= event.msgid <= rpc.MAX_MSGID
        assert isinstance(event.method, str)
        assert isinstance(event.params, list)
    else:
        assert isinstance(event, rpc.Notification)
        assert obj[0] == rpc.NOTIFICATION
        assert [event.method, event.params] == obj[1:]


def test_client_rejects_unexpected_messages() -> None:
    client = rpc.ClientConnection()
    for obj, error in [
        ([1, 5, None, 1], rpc.BadMsgidError),  # never sent
        ([1, -5, None, 1], rpc.BadMsgidError),
        ([0, 1, "m", []], rpc.UnknownKindError),  # servers do not send requests
        ([1, 5, None], rpc.BadShapeError),
    ]:
        client.receive_data(_pack(obj))
        with pytest.raises(error):
            client.next_event()


def test_local_mistakes_are_local_protocol_errors() -> None:
    client, server = (
        rpc.ClientConnection(),
        rpc.ServerConnection(rpc.RpcLimits(max_message_size=100)),
    )
    with pytest.raises(LocalProtocolError):
        server.send_response(3, None, None)  # never received
    with pytest.raises(LocalProtocolError):
        server.send_stream_notification(3, "m", [])
    with pytest.raises(LocalProtocolError):
        server.send_rejection(rpc.BadShapeError("no msgid"))
    msgid, data = client.send_request("m", [])
    _events(server, [data])
    with pytest.raises(LocalProtocolError, match="exceeds"):
        server.send_response(msgid, None, "x" * 200)
    with pytest.raises(LocalProtocolError, match="encoded"):
        server.send_response(msgid, None, object())
    # A failed send leaves the request in flight, so it can still be answered.
    assert server.send_response(msgid, None, "ok")
    with pytest.raises(LocalProtocolError):
        client.send_request("m", [object()])


def test_a_method_in_a_utf8_bin_is_accepted_like_a_str() -> None:
    """Neovim-convention clients (pynvim's generic msgpack-rpc session) send methods as bin."""
    server = rpc.ServerConnection()
    server.receive_data(msgpack.packb([0, 1, b"node.info", []], use_bin_type=True))
    server.receive_data(msgpack.packb([2, b"nvim_subscribe", ["x"]], use_bin_type=True))
    assert server.next_event() == rpc.Request(1, "node.info", [])
    assert server.next_event() == rpc.Notification("nvim_subscribe", ["x"])
