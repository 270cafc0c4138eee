"""ICE servers for ``welcome`` and ``refreshed`` (PROTOCOL.md §9): STUN URLs as configured,
and TURN REST credentials in coturn's ``use-auth-secret`` form — username
``<expiry unix time>:<user_id>``, credential base64(HMAC-SHA1(TURN_SECRET, username))."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from .config import Settings


def turn_credential(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def ice_servers(settings: Settings, user_id: str, now: float | None = None) -> list[dict[str, Any]]:
    """The ``ice_servers`` list for ``user_id``; empty when nothing is configured."""
    servers: list[dict[str, Any]] = []
    if settings.stun_urls:
        servers.append({"urls": list(settings.stun_urls)})
    if settings.turn_secret and settings.turn_urls:
        expiry = int(time.time() if now is None else now) + settings.turn_ttl
        username = f"{expiry}:{user_id}"
        servers.append(
            {
                "urls": list(settings.turn_urls),
                "username": username,
                "credential": turn_credential(settings.turn_secret, username),
            }
        )
    return servers


def ice_fields(settings: Settings, user_id: str) -> dict[str, Any]:
    """``{"ice_servers": [...]}`` when configured, else ``{}`` (the field is omitted)."""
    servers = ice_servers(settings, user_id)
    return {"ice_servers": servers} if servers else {}
