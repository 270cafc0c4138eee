"""Token verification (PROTOCOL.md §1).  ``Verifier.verify`` returns an :class:`Identity`
or raises :class:`~service.errors.AuthError` with the HTTP code to answer; it never logs the
token.  ``extract_token`` picks the token from the three carriers, first found wins.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .config import Settings
from .errors import AuthError, HttpCode
from .protocol import IDENT_PATTERN

_IDENT = re.compile(IDENT_PATTERN)
SUBPROTOCOL = "signaling.v1"
_BEARER_PREFIX = "bearer."


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is, from a verified token."""

    user_id: str
    device_id: str
    expires_at: int
    # None = any room; else exact names, and prefixes for entries ending in "*".
    rooms: tuple[str, ...] | None = None

    def may_join(self, room: str) -> bool:
        if self.rooms is None:
            return True
        return any(
            room.startswith(r[:-1]) if r.endswith("*") else room == r for r in self.rooms
        )


def extract_token(
    query_token: str | None, authorization: str | None, subprotocols: str | None
) -> str | None:
    """The first non-empty token among ``?token=``, ``Authorization: Bearer`` and the
    ``bearer.<jwt>`` subprotocol; None when there is none."""
    if query_token:
        return query_token
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if subprotocols:
        for part in subprotocols.split(","):
            part = part.strip()
            if part.startswith(_BEARER_PREFIX) and len(part) > len(_BEARER_PREFIX):
                return part[len(_BEARER_PREFIX) :]
    return None


class Verifier:
    """Checks tokens against one configured key and algorithm family."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key: Any = settings.jwt_public_key or settings.jwt_secret
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})
        required = ["exp", "user_id", "device_id"]
        if settings.jwt_issuer:
            required.append("iss")
        if settings.jwt_audience:
            required.append("aud")
        self._options: Any = {"require": required, "verify_aud": bool(settings.jwt_audience)}

    def verify(self, token: str, now: float | None = None) -> Identity:
        """Raise AuthError(invalid_token | token_expired | token_lifetime_too_long)."""
        s = self._settings
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=list(s.jwt_algorithms),
                options=self._options,
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(HttpCode.TOKEN_EXPIRED, "token has expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(HttpCode.INVALID_TOKEN, _reason(exc)) from None
        return self._identity(claims, time.time() if now is None else now)

    def _identity(self, claims: dict[str, Any], now: float) -> Identity:
        user, device, exp = claims.get("user_id"), claims.get("device_id"), claims.get("exp")
        for name, value in (("user_id", user), ("device_id", device)):
            if not isinstance(value, str) or not _IDENT.match(value):
                raise AuthError(HttpCode.INVALID_TOKEN, f"claim {name} is not a valid identifier")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthError(HttpCode.INVALID_TOKEN, "claim exp is not a number")
        if exp - now > self._settings.max_token_ttl + self._settings.jwt_leeway:
            raise AuthError(
                HttpCode.TOKEN_LIFETIME_TOO_LONG,
                f"token expires more than {self._settings.max_token_ttl} s ahead",
            )
        rooms = claims.get("rooms")
        if rooms is not None and (
            not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)
        ):
            raise AuthError(HttpCode.INVALID_TOKEN, "claim rooms must be a list of strings")
        assert isinstance(user, str) and isinstance(device, str)
        return Identity(user, device, int(exp), tuple(rooms) if rooms is not None else None)


def _reason(exc: Exception) -> str:
    """A human reason that never quotes the token."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the required claim {exc.claim}"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm is not allowed"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token signature does not verify"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience is not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer is not accepted"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token is not valid yet"
    return "token is malformed or invalid"


def mint(
    secret: str,
    user_id: str,
    device_id: str,
    ttl: int = 3600,
    rooms: list[str] | None = None,
    algorithm: str = "HS256",
    **extra: Any,
) -> str:
    """Sign a token (the auth helper, tests and benchmarks).  ``secret`` is the HS256 secret
    or a PEM private key for the asymmetric algorithms."""
    now = int(time.time())
    claims: dict[str, Any] = {"user_id": user_id, "device_id": device_id, "iat": now}
    claims["exp"] = now + ttl
    if rooms is not None:
        claims["rooms"] = rooms
    claims.update(extra)
    return jwt.encode(claims, secret, algorithm=algorithm)
