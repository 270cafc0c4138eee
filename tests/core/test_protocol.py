"""protocol.parse: every input is a message or a ProtocolError with a documented code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import Code, ProtocolError
from service.protocol import Direct, PresenceQuery, encode_direct, parse


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
        ('{"type": "presence", "users": "u1"}', ("invalid_message", None)),
        ('{"type": "presence", "users": ' + json.dumps([f"u{i}" for i in range(101)]) + "}",
         ("invalid_message", None)),
        ('{"type": "watch", "users": ' + json.dumps([f"u{i}" for i in range(201)]) + "}",
         ("invalid_message", None)),
    ],
)
def test_refusals_have_their_codes(frame: str, expected: tuple[str, str | None]) -> None:
    assert code_of(frame) == expected


def test_direct_keeps_payload_bytes_and_optional_fields() -> None:
    msg = parse('{"type":"candidate","to":"bob@x.org","to_device":"d-1:2",'
                '"payload":  [1, {"a" : null}] ,"id":"m","extra":true}')
    assert isinstance(msg, Direct)
    assert (msg.to, msg.to_device, msg.id) == ("bob@x.org", "d-1:2", "m")
    assert bytes(msg.payload) == b'[1, {"a" : null}]'
    out = json.loads(encode_direct(msg, "alice", "a1", 123))
    assert out == {"type": "candidate", "from": "alice", "from_device": "a1",
                   "payload": [1, {"a": None}], "ts": 123, "id": "m"}


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
