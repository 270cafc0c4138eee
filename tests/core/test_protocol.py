"""protocol.parse: every input is a message or a ProtocolError with a documented code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import protocol
from service.errors import Code, ProtocolError
from service.protocol import (
    IDENT_CACHE_MAX,
    Direct,
    PresenceQuery,
    encode,
    encode_ack,
    encode_direct,
    parse,
    parse_direct,
)


def code_of(frame: str | bytes) -> tuple[str, str | None]:
    with pytest.raises(ProtocolError) as info:
        parse(frame)
    return str(info.value.code), info.value.msg_id


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("{nope", ("bad_json", None)),
        ("[1, 2]", ("bad_json", None)),
        ('"offer"', ("bad_json", None)),
        ("", ("bad_json", None)),
        ("{}", ("invalid_message", None)),
        ('{"type": 5, "id": "a"}', ("invalid_message", "a")),
        ('{"type": "dance", "id": "a"}', ("unknown_type", "a")),
        ('{"type": "offer", "id": "' + "x" * 65 + '"}', ("invalid_message", None)),
        ('{"type": "offer", "id": 7}', ("invalid_message", None)),
        ('{"type": "offer", "id": "i"}', ("invalid_message", "i")),
        ('{"type": "offer", "to": "bad id", "id": "i"}', ("invalid_message", "i")),
        ('{"type": "offer", "to": "' + "u" * 129 + '"}', ("invalid_message", None)),
        ('{"type": "offer", "to": "u", "to_device": ""}', ("invalid_message", None)),
        # the whole string must match: ``$`` would accept a trailing newline
        ('{"type": "offer", "to": "bob\\n", "id": "i"}', ("invalid_message", "i")),
        ('{"type": "offer", "to": "bob", "to_device": "d\\n"}', ("invalid_message", None)),
        ('{"type": "subscribe", "room": "r\\n"}', ("invalid_message", None)),
        ('{"type": "presence", "users": ["u\\n"]}', ("invalid_message", None)),
        ('{"type": "presence", "users": "u1"}', ("invalid_message", None)),
        ('{"type": "presence", "users": ' + json.dumps([f"u{i}" for i in range(101)]) + "}",
         ("invalid_message", None)),
        ('{"type": "watch", "users": ' + json.dumps([f"u{i}" for i in range(201)]) + "}",
         ("invalid_message", None)),
    ],
)
def test_refusals_have_their_codes(frame: str, expected: tuple[str, str | None]) -> None:
    assert code_of(frame) == expected


def test_a_malformed_identifier_is_named_in_the_documented_form() -> None:
    with pytest.raises(ProtocolError) as info:
        parse('{"type": "offer", "to": "bob\\n"}')
    assert info.value.message == (
        "expected an identifier matching [A-Za-z0-9._:@-]{1,128} (the whole string)"
        " - at `$.to`")
    assert "bob" not in info.value.message  # never the value sent


def test_direct_keeps_payload_bytes_and_optional_fields() -> None:
    msg = parse('{"type":"candidate","to":"bob@x.org","to_device":"d-1:2",'
                '"payload":  [1, {"a" : null}] ,"id":"m","extra":true}')
    assert isinstance(msg, Direct)
    assert (msg.to, msg.to_device, msg.id) == ("bob@x.org", "d-1:2", "m")
    assert bytes(msg.payload) == b'[1, {"a" : null}]'
    out = json.loads(encode_direct(msg, "alice", "a1", 123))
    assert out == {"type": "candidate", "from": "alice", "from_device": "a1",
                   "payload": [1, {"a": None}], "ts": 123, "id": "m"}


def test_a_delivered_message_without_id_has_no_id_field_and_keeps_the_field_order() -> None:
    msg = parse('{"type":"offer","to":"bob","payload":{"sdp":"v=0"}}')
    assert isinstance(msg, Direct) and msg.id is None
    assert encode_direct(msg, "alice", "a1", 7) == (
        b'{"type":"offer","from":"alice","from_device":"a1","payload":{"sdp":"v=0"},"ts":7}')
    bare = parse('{"type":"bye","to":"bob"}')  # no payload: null, as documented
    assert isinstance(bare, Direct)
    assert json.loads(encode_direct(bare, "alice", "a1", 7))["payload"] is None


def test_id_of_exactly_64_and_presence_of_100_are_accepted() -> None:
    msg = parse(json.dumps({"type": "presence", "users": [f"u{i}" for i in range(100)],
                            "id": "y" * 64}))
    assert isinstance(msg, PresenceQuery) and len(msg.users) == 100 and msg.id == "y" * 64


DOCUMENTED = {c.value for c in (Code.BAD_JSON, Code.INVALID_MESSAGE, Code.UNKNOWN_TYPE)}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
frames_like_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["offer", "answer", "candidate", "bye", "ping", "presence",
                              "subscribe", "publish", "refresh", "x"]) | json_values},
    optional={"to": json_values | st.text(max_size=140), "to_device": json_values,
              "payload": json_values, "id": json_values | st.text(max_size=70),
              "users": st.lists(st.text(max_size=10), max_size=5) | json_values,
              "room": json_values, "token": json_values},
).map(json.dumps)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), frames_like_messages))
def test_parse_never_raises_anything_undocumented(frame: str | bytes) -> None:
    try:
        parse(frame)
    except ProtocolError as exc:
        assert exc.code.value in DOCUMENTED
        assert exc.msg_id is None or (isinstance(exc.msg_id, str) and len(exc.msg_id) <= 64)


idents = st.from_regex(r"[A-Za-z0-9._:@-]{1,130}\n?", fullmatch=True)
direct_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["offer", "answer", "candidate", "bye", "ping"]) | json_values},
    optional={"to": idents | json_values, "to_device": idents | st.none() | json_values,
              "payload": json_values, "id": st.text(max_size=70) | st.none() | json_values,
              "other": json_values},
).map(lambda d: json.dumps(d).encode())


@settings(max_examples=600, deadline=None)
@given(st.one_of(direct_like, frames_like_messages.map(str.encode), st.binary(max_size=100)))
def test_parse_direct_accepts_exactly_the_direct_messages_parse_accepts(frame: bytes) -> None:
    """The inline path's one-decode parser: the same message as ``parse`` for every valid
    direct message, None for everything else (which ``parse`` then answers)."""
    fast = parse_direct(frame)
    try:
        full = parse(frame)
    except ProtocolError:
        full = None
    if not isinstance(full, Direct):
        assert fast is None
        return
    assert fast is not None
    for field in ("type", "to", "to_device", "id"):
        assert getattr(fast, field) == getattr(full, field)
    assert bytes(fast.payload) == bytes(full.payload)


def test_parse_direct_remembers_identifiers_but_still_checks_new_ones() -> None:
    ok = b'{"type":"offer","to":"bob","payload":1}'
    assert parse_direct(ok) is not None and parse_direct(ok) is not None
    assert parse_direct(b'{"type":"offer","to":"b b","payload":1}') is None
    assert parse_direct(b'{"type":"offer","to":"bob","to_device":"","payload":1}') is None
    assert parse_direct(b'{"type":"offer","to":"bob\\n","payload":1}') is None
    assert parse_direct(b'{"type":"offer","to":"bob","to_device":"d\\n"}') is None
    for i in range(IDENT_CACHE_MAX + 10):  # bounded
        assert parse_direct(b'{"type":"bye","to":"u%d"}' % i) is not None
    assert 0 < len(protocol._valid_idents) <= IDENT_CACHE_MAX


def test_encode_ack_is_the_dict_encoding() -> None:
    for msg_id in ("m1", 'q"uo\\te', "\u00e9\u2028", "x" * 64):
        for devices in (1, 7, 15, 16, 123456):  # from the table, and formatted
            assert encode_ack(msg_id, devices) == encode(
                {"type": "ack", "id": msg_id, "devices": devices})
