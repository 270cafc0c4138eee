"""Settings: one frozen object built from the environment (the CLI turns its flags into
environment variables first, so flags win).  Every name below is the environment variable
PROTOCOL.md or the original server uses.  ``Settings.from_env`` raises :class:`ConfigError`
with a message meant for an operator; callers print it and exit non-zero.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MIN_SECRET_BYTES = 32
_ASYMMETRIC = ("RS256", "ES256", "EdDSA")


class ConfigError(Exception):
    """A setting is missing or unusable; the message says which and how to fix it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(name, "").split(",") if p.strip())


def redis_url_from(env: Mapping[str, str]) -> str | None:
    """``REDIS_URL`` as given, or ``REDIS_ADDR`` (``host:port``, as the original) as a URL."""
    url = env.get("REDIS_URL", "").strip()
    if url:
        if not re.match(r"^(redis|rediss|unix)://", url):
            raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
        return url
    addr = env.get("REDIS_ADDR", "").strip()
    if not addr:
        return None
    if "://" in addr:
        return addr
    host, _, port = addr.rpartition(":")
    if not host:
        host, port = addr, "6379"
    return f"redis://{host or 'localhost'}:{port or '6379'}/0"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an instance needs; built once per process by :meth:`from_env`."""

    # Redis URL of the shared backplane; None = one instance on the in-process backplane.
    redis_url: str | None = None
    # HS256 secret (>= 32 bytes); not needed when JWT_PUBLIC_KEY is set.
    jwt_secret: str = field(default="", repr=False)
    # PEM public key (file contents) for RS256/ES256/EdDSA; None = HS256 with the secret.
    jwt_public_key: str | None = field(default=None, repr=False)
    # Accepted algorithms: exactly one family, never "none".
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    # Required `iss` claim when set.
    jwt_issuer: str | None = None
    # Required `aud` claim when set.
    jwt_audience: str | None = None
    # Clock leeway for exp/nbf/iat, seconds.
    jwt_leeway: int = 0
    # A token whose exp is further ahead than this is refused (token_lifetime_too_long).
    max_token_ttl: int = 3600
    # Largest accepted frame; bigger ones close the connection with 1009.
    max_message_bytes: int = 65536
    # Per-user message budget across the cluster, in `limits` notation.
    rate_limit: str = "100/second"
    # Seconds after which an instance that stopped heart-beating is dead (and its keys gone).
    presence_ttl: int = 15
    # Open connections one user may hold across the cluster (429 beyond).
    max_devices_per_user: int = 10
    # Rooms one connection may be in.
    max_rooms_per_connection: int = 50
    # Members one room may hold.
    max_room_members: int = 500
    # Users one presence query may name.
    max_presence_query: int = 100
    # Users one connection may watch.
    max_watch: int = 200
    # Seconds before expiry at which `token_expiring` is sent.
    token_expiring_notice: int = 60
    # Browser origins allowed to upgrade; empty = any.
    allowed_origins: tuple[str, ...] = ()
    # coturn use-auth-secret shared secret; None = no TURN credentials.
    turn_secret: str | None = field(default=None, repr=False)
    # turn:/turns: URLs handed out with credentials.
    turn_urls: tuple[str, ...] = ()
    # stun: URLs handed out as they are.
    stun_urls: tuple[str, ...] = ()
    # Lifetime of TURN credentials, seconds.
    turn_ttl: int = 3600
    # Seconds a dropped device stays online, its direct messages kept (0 = no resume).
    resume_window: int = 30
    # Messages kept per parked device; the oldest are dropped first.
    resume_max_messages: int = 1000
    # Seconds the worker of a replaced connection has to confirm the 4009 before it is taken
    # for crashed (then the new connection resumes instead, §10).
    takeover_probe: float = 2.0
    # Approximate cap on each worker's inbox stream (XADD MAXLEN ~).
    inbox_maxlen: int = 10000
    # Entries one XREADGROUP may return.
    inbox_read_count: int = 512
    # XREADGROUP BLOCK, milliseconds.
    inbox_block_ms: int = 1000
    # Messages a connection's outgoing queue may hold before it is closed (slow consumer).
    outbox_max_messages: int = 1024
    # Bytes a connection's outgoing queue may hold before it is closed (slow consumer).
    outbox_max_bytes: int = 4 * 1024 * 1024
    # WebSocket ping interval / timeout, seconds (0 disables).
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    # SIGTERM: seconds over which open sockets are closed with 1012 (spread, not at once).
    drain_seconds: float = 5.0
    # SIGTERM: seconds the whole stop may take (keep below the Kubernetes grace period).
    graceful_shutdown_timeout: float = 15.0
    # Seconds a Redis command may take before it counts as failed.
    redis_timeout: float = 2.0
    # Log at DEBUG (never tokens, addresses or payloads).
    verbose: bool = False

    @property
    def keep_ttl(self) -> int:
        """TTL of every key that must outlive a dead worker long enough to be resumed or
        swept: two heartbeat lifetimes plus the resume window."""
        return 2 * self.presence_ttl + self.resume_window

    @property
    def heartbeat_interval(self) -> float:
        """Refresh presence/liveness three times per PRESENCE_TTL so one lost beat is harmless."""
        return max(self.presence_ttl / 3.0, 0.2)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build and validate; raises :class:`ConfigError` with an operator-facing message."""
        env = os.environ if env is None else env
        public_key = _read_public_key(env)
        secret = env.get("JWT_SECRET", "")
        if public_key is None:
            if not secret:
                raise ConfigError(
                    "JWT_SECRET is not set: give a random secret of at least 32 bytes "
                    "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) "
                    "or set JWT_PUBLIC_KEY to a PEM public key file"
                )
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"JWT_SECRET is too short ({len(secret.encode())} bytes): HS256 needs at "
                    f"least {MIN_SECRET_BYTES} random bytes"
                )
            algorithms: tuple[str, ...] = ("HS256",)
        else:
            algorithms = _algorithms(env)
        rate_limit = env.get("RATE_LIMIT", "").strip() or "100/second"
        _check_rate_limit(rate_limit)
        turn_secret = env.get("TURN_SECRET", "") or None
        drain = _float(env, "DRAIN_SECONDS", 5.0)
        grace = _float(env, "GRACEFUL_SHUTDOWN_TIMEOUT", 15.0, 1.0)
        if drain >= grace:
            raise ConfigError(
                f"DRAIN_SECONDS ({drain}) must be shorter than GRACEFUL_SHUTDOWN_TIMEOUT ({grace})"
            )
        return cls(
            redis_url=redis_url_from(env),
            jwt_secret=secret,
            jwt_public_key=public_key,
            jwt_algorithms=algorithms,
            jwt_issuer=env.get("JWT_ISSUER") or None,
            jwt_audience=env.get("JWT_AUDIENCE") or None,
            jwt_leeway=_int(env, "JWT_LEEWAY", 0),
            max_token_ttl=_int(env, "MAX_TOKEN_TTL", 3600, 1),
            max_message_bytes=_int(env, "MAX_MESSAGE_BYTES", 65536, 256),
            rate_limit=rate_limit,
            presence_ttl=_int(env, "PRESENCE_TTL", 15, 1),
            max_devices_per_user=_int(env, "MAX_DEVICES_PER_USER", 10, 1),
            max_rooms_per_connection=_int(env, "MAX_ROOMS_PER_CONNECTION", 50, 1),
            max_room_members=_int(env, "MAX_ROOM_MEMBERS", 500, 2),
            token_expiring_notice=_int(env, "TOKEN_EXPIRING_NOTICE", 60),
            allowed_origins=_list(env, "ALLOWED_ORIGINS"),
            turn_secret=turn_secret,
            turn_urls=_list(env, "TURN_URLS"),
            stun_urls=_list(env, "STUN_URLS"),
            turn_ttl=_int(env, "TURN_TTL", 3600, 60),
            inbox_maxlen=_int(env, "INBOX_MAXLEN", 10000, 100),
            resume_window=_int(env, "RESUME_WINDOW", 30),
            resume_max_messages=_int(env, "RESUME_MAX_MESSAGES", 1000, 1),
            takeover_probe=_float(env, "TAKEOVER_PROBE", 2.0, 0.05),
            outbox_max_messages=_int(env, "OUTBOX_MAX_MESSAGES", 1024, 8),
            outbox_max_bytes=_int(env, "OUTBOX_MAX_BYTES", 4 * 1024 * 1024, 65536),
            ws_ping_interval=_float(env, "WS_PING_INTERVAL", 20.0),
            ws_ping_timeout=_float(env, "WS_PING_TIMEOUT", 20.0),
            redis_timeout=_float(env, "REDIS_TIMEOUT", 2.0, 0.05),
            drain_seconds=drain,
            graceful_shutdown_timeout=grace,
            verbose=env.get("VERBOSE", "").lower() in ("1", "true", "yes", "on"),
        )


def _read_public_key(env: Mapping[str, str]) -> str | None:
    path = env.get("JWT_PUBLIC_KEY", "").strip()
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY: cannot read {path}: {exc.strerror}") from None
    if "PUBLIC KEY" not in text:
        raise ConfigError(f"JWT_PUBLIC_KEY: {path} is not a PEM public key")
    return text


def _algorithms(env: Mapping[str, str]) -> tuple[str, ...]:
    """Asymmetric algorithms allowed with a public key; HS* is never allowed beside one."""
    algs = _list(env, "JWT_ALGORITHMS") or _ASYMMETRIC
    bad = [a for a in algs if a not in _ASYMMETRIC]
    if bad:
        raise ConfigError(
            f"JWT_ALGORITHMS: {', '.join(bad)} not allowed with JWT_PUBLIC_KEY "
            f"(choose from {', '.join(_ASYMMETRIC)})"
        )
    return algs


def _check_rate_limit(text: str) -> None:
    from limits import parse  # local: keeps `limits` out of modules that only read settings

    try:
        parse(text)
    except ValueError:
        raise ConfigError(f"RATE_LIMIT: {text!r} is not like '100/second'") from None
