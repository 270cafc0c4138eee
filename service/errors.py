"""Every error code and close code of PROTOCOL.md, in one place.

Callers raise :class:`ProtocolError` (an ``error`` frame, connection stays open) or
:class:`AuthError` (an HTTP answer before the upgrade); nothing else reaches the wire.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Code(StrEnum):
    """``error`` frame codes (PROTOCOL.md §7)."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    RATE_LIMITED = "rate_limited"
    PEER_OFFLINE = "peer_offline"
    NOT_SUBSCRIBED = "not_subscribed"
    FORBIDDEN_ROOM = "forbidden_room"
    TOO_MANY_ROOMS = "too_many_rooms"
    ROOM_FULL = "room_full"
    INVALID_TOKEN = "invalid_token"
    IDENTITY_MISMATCH = "identity_mismatch"
    INTERNAL = "internal"


class HttpCode(StrEnum):
    """``{"error": ...}`` bodies of answers given before the upgrade (PROTOCOL.md §1)."""

    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_LIFETIME_TOO_LONG = "token_lifetime_too_long"
    UNAVAILABLE = "unavailable"
    TOO_MANY_DEVICES = "too_many_devices"
    FORBIDDEN_ORIGIN = "forbidden_origin"


class Close(IntEnum):
    """WebSocket close codes (PROTOCOL.md §7)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTART = 1012
    TOKEN_EXPIRED = 4001
    REPLACED = 4009


HTTP_STATUS: dict[HttpCode, int] = {
    HttpCode.MISSING_TOKEN: 401,
    HttpCode.INVALID_TOKEN: 401,
    HttpCode.TOKEN_EXPIRED: 401,
    HttpCode.TOKEN_LIFETIME_TOO_LONG: 401,
    HttpCode.UNAVAILABLE: 503,
    HttpCode.TOO_MANY_DEVICES: 429,
    HttpCode.FORBIDDEN_ORIGIN: 403,
}


class ProtocolError(Exception):
    """A client message was refused; becomes one ``error`` frame.

    ``msg_id`` is echoed only when it was a valid id; ``extra`` adds fields such as
    ``to`` (peer_offline) or ``retry_after_ms`` (rate_limited).
    """

    def __init__(
        self,
        code: Code,
        message: str,
        msg_id: str | None = None,
        **extra: object,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id
        self.extra = extra


class AuthError(Exception):
    """The upgrade is refused; becomes an HTTP answer with a JSON body."""

    def __init__(self, code: HttpCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]
