"""Every wire message of PROTOCOL.md: ``parse(frame)`` for client frames, ``encode_*`` for
server frames.

Parsing and validation happen in one msgspec step per frame.  Payloads are kept as
``msgspec.Raw`` (the exact bytes the client sent), so the server never inspects or
re-serialises them.  ``parse`` either returns a message or raises
:class:`~service.errors.ProtocolError` with the code PROTOCOL.md §7 names — nothing else.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Final, Literal

import msgspec

from .errors import Code, ProtocolError

# the whole string (``\Z``, not ``$``: that would accept a trailing newline); msgspec and
# the token check both apply it with Python's ``re``
IDENT_PATTERN: Final = r"^[A-Za-z0-9._:@-]{1,128}\Z"
MAX_ID_LEN: Final = 64
MAX_PRESENCE_USERS: Final = 100
MAX_WATCH_USERS: Final = 200

Ident = Annotated[str, msgspec.Meta(pattern=IDENT_PATTERN)]
NULL: Final = msgspec.Raw(b"null")

DIRECT_TYPES: Final = frozenset({"offer", "answer", "candidate", "bye"})


class _Head(msgspec.Struct):
    """What every frame is checked for before its own schema: a string type and a valid id."""

    type: Any = msgspec.UNSET
    id: Any = msgspec.UNSET


class DirectFields(msgspec.Struct):
    """What the router reads of a direct message (``Direct`` or ``parse_direct``'s)."""

    type: str
    to: str
    to_device: str | None = None
    payload: msgspec.Raw = NULL
    id: str | None = None


class Direct(DirectFields):
    """offer / answer / candidate / bye (§3)."""

    to: Ident
    to_device: Ident | None = None


class _CheckedDirect(DirectFields):
    """``parse``'s checks of a direct message but the identifier pattern (which msgspec runs
    through ``re`` for every frame: ``parse_direct`` remembers identifiers it has seen)."""

    type: Literal["offer", "answer", "candidate", "bye"]
    id: Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)] | None = None


class Ping(msgspec.Struct):
    type: str
    id: str | None = None


class PresenceQuery(msgspec.Struct):
    type: str
    users: Annotated[list[Ident], msgspec.Meta(max_length=MAX_PRESENCE_USERS)]
    id: str | None = None


class Watch(msgspec.Struct):
    type: str
    users: Annotated[list[Ident], msgspec.Meta(max_length=MAX_WATCH_USERS)]
    id: str | None = None


class Unwatch(msgspec.Struct):
    type: str
    users: Annotated[list[Ident], msgspec.Meta(max_length=MAX_WATCH_USERS)]
    id: str | None = None


class Subscribe(msgspec.Struct):
    type: str
    room: Ident
    id: str | None = None


class Unsubscribe(msgspec.Struct):
    type: str
    room: Ident
    id: str | None = None


class Publish(msgspec.Struct):
    type: str
    room: Ident
    payload: msgspec.Raw = NULL
    id: str | None = None


class Refresh(msgspec.Struct):
    type: str
    token: str
    id: str | None = None


Message = (
    Direct | Ping | PresenceQuery | Watch | Unwatch | Subscribe | Unsubscribe | Publish | Refresh
)

_head = msgspec.json.Decoder(_Head)
_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    **{t: msgspec.json.Decoder(Direct) for t in DIRECT_TYPES},
    "ping": msgspec.json.Decoder(Ping),
    "presence": msgspec.json.Decoder(PresenceQuery),
    "watch": msgspec.json.Decoder(Watch),
    "unwatch": msgspec.json.Decoder(Unwatch),
    "subscribe": msgspec.json.Decoder(Subscribe),
    "unsubscribe": msgspec.json.Decoder(Unsubscribe),
    "publish": msgspec.json.Decoder(Publish),
    "refresh": msgspec.json.Decoder(Refresh),
}
KNOWN_TYPES: Final = frozenset(_DECODERS)


def parse(frame: str | bytes) -> Message:
    """Decode and validate one client text frame.

    Raises ProtocolError(bad_json | invalid_message | unknown_type); the error carries the
    client's ``id`` only when that id is itself valid (a string of at most 64 characters).
    """
    try:
        head = _head.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise ProtocolError(Code.BAD_JSON, "frame is not a JSON object") from None
    msg_id = head.id
    if msg_id is msgspec.UNSET or msg_id is None:
        msg_id = None
    elif not isinstance(msg_id, str) or len(msg_id) > MAX_ID_LEN:
        raise ProtocolError(
            Code.INVALID_MESSAGE, f"id must be a string of at most {MAX_ID_LEN} characters"
        )
    kind = head.type
    if not isinstance(kind, str):
        raise ProtocolError(Code.INVALID_MESSAGE, "type must be a string", msg_id)
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(Code.UNKNOWN_TYPE, "unknown message type", msg_id)
    try:
        msg: Message = decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(Code.INVALID_MESSAGE, _describe(exc), msg_id) from None
    except msgspec.DecodeError:  # pragma: no cover - the head decode already accepted it
        raise ProtocolError(Code.BAD_JSON, "frame is not a JSON object", msg_id) from None
    return msg


_direct = msgspec.json.Decoder(_CheckedDirect)
_ident = re.compile(IDENT_PATTERN).search  # as msgspec applies a pattern
IDENT_CACHE_MAX: Final = 16384  # identifiers remembered as valid (emptied when full)
_valid_idents: set[str] = set()


def _is_ident(value: str) -> bool:
    if value in _valid_idents:
        return True
    if _ident(value) is None:
        return False
    if len(_valid_idents) >= IDENT_CACHE_MAX:
        _valid_idents.clear()
    _valid_idents.add(value)
    return True


def parse_direct(frame: str | bytes) -> DirectFields | None:
    """The direct message (§3) in ``frame`` when it is a valid one: what ``parse`` would
    return, in one decode.  None for anything else (another type, or any error): the caller
    must then use ``parse``, which names the error."""
    try:
        msg = _direct.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    to = msg.to
    if to not in _valid_idents and not _is_ident(to):  # the cache's hit without a call
        return None
    if msg.to_device is not None and not _is_ident(msg.to_device):
        return None
    return msg


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec's message names the field and the rule, never the value sent."""
    text = str(exc)
    return text.replace("Expected `str` matching regex", "expected an identifier matching").replace(
        repr(IDENT_PATTERN), "[A-Za-z0-9._:@-]{1,128} (the whole string)")


# --------------------------------------------------------------------------- server frames

_encode = msgspec.json.Encoder().encode


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(obj: dict[str, Any]) -> bytes:
    """Serialise one server frame (dict values may include msgspec.Raw payloads)."""
    return _encode(obj)


def encode_error(err: ProtocolError) -> bytes:
    body: dict[str, Any] = {"type": "error", "code": str(err.code), "message": err.message}
    if err.msg_id is not None:
        body["id"] = err.msg_id
    body.update(err.extra)
    return _encode(body)


class _DirectOut(msgspec.Struct, omit_defaults=True, rename={"from_": "from"}):
    """A delivered direct message, field for field (and in order) what ``encode`` makes of
    its dict: encoding a struct skips building and hashing a dict (~390 -> 240 ns)."""

    type: str
    from_: str
    from_device: str
    payload: msgspec.Raw
    ts: int
    id: str | None = None  # omitted when None


def encode_direct(msg: DirectFields, from_user: str, from_device: str, ts: int) -> bytes:
    """The frame each recipient device receives (§3); built once per message, not per device."""
    return _encode(_DirectOut(msg.type, from_user, from_device, msg.payload, ts, msg.id))


_ACK_HEAD = b'{"type":"ack","id":'
_ACK_TAILS = [b',"devices":%d}' % n for n in range(16)]  # the usual device counts


def encode_ack(msg_id: str, devices: int) -> bytes:
    """``{"type":"ack","id":..,"devices":..}`` (§3), byte for byte what ``encode`` makes of
    that dict, without building one per message (nor formatting the usual counts)."""
    tail = _ACK_TAILS[devices] if devices < 16 else b',"devices":%d}' % devices
    return _ACK_HEAD + _encode(msg_id) + tail


def with_id(body: dict[str, Any], msg_id: str | None) -> bytes:
    """Encode a reply, echoing the client's id when it gave one."""
    if msg_id is not None:
        body["id"] = msg_id
    return _encode(body)
