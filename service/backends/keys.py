"""Every Redis key this service writes, under one prefix.  Keys carry user, device and node
ids only — never an address, a token or a payload."""

from __future__ import annotations

from typing import Final

PREFIX: Final = "sig:"
# Rate-limiter keys are written by `limits` under this prefix.
LIMITS_PREFIX: Final = "sig:rl"
# The consumer group every inbox stream has, and each worker's consumer name in it.
GROUP: Final = "sig"
CONSUMER: Final = "c"


def devices(user: str) -> str:
    """Hash device_id -> "node|conn" of one user's live devices; TTL PRESENCE_TTL."""
    return f"{PREFIX}dev:{user}"


def room(name: str) -> str:
    """Hash "user/device" -> "node|conn" of one room's members; TTL 2 x PRESENCE_TTL."""
    return f"{PREFIX}room:{name}"


def watchers(user: str) -> str:
    """Set of nodes watching ``user``'s presence; TTL 2 x PRESENCE_TTL."""
    return f"{PREFIX}watch:{user}"


def device_rooms(user: str, device: str) -> str:
    """Set of the rooms one device is in (takeover and resume); TTL like ``devices``."""
    return f"{PREFIX}devrooms:{user}/{device}"


def kept(user: str, device: str) -> str:
    """List of frames kept for a parked device (§10); bounded, TTL the resume window."""
    return f"{PREFIX}kept:{user}/{device}"


def node_seen(node: str) -> str:
    """Exists PRESENCE_TTL + RESUME_WINDOW after the last heartbeat of ``node``: its devices
    stay resumable while it does (the node prefix + ":seen")."""
    return f"{node_alive(node)}:seen"


def node_alive_prefix() -> str:
    return f"{PREFIX}node:"


def node_alive(node: str) -> str:
    """String key that exists while worker ``node`` heart-beats; TTL PRESENCE_TTL."""
    return f"{node_alive_prefix()}{node}"


def inbox(node: str) -> str:
    """Stream read by worker ``node`` through consumer group GROUP; TTL 2 x PRESENCE_TTL."""
    return f"{PREFIX}inbox:{node}"
