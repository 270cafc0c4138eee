from __future__ import annotations

import pytest

from service.cli import parse_addr
from service.config import ConfigError, Settings, redis_url_from

SECRET = "k" * 32


def test_defaults_match_the_protocol() -> None:
    s = Settings.from_env({"JWT_SECRET": SECRET})
    assert s.redis_url is None
    assert (s.max_message_bytes, s.rate_limit, s.max_token_ttl) == (65536, "100/second", 3600)
    assert (s.presence_ttl, s.max_devices_per_user, s.jwt_leeway) == (15, 10, 0)
    assert (s.max_rooms_per_connection, s.max_room_members, s.token_expiring_notice) == (
        50, 500, 60)
    assert s.jwt_algorithms == ("HS256",)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "JWT_SECRET is not set"),
        ({"JWT_SECRET": "short"}, "too short"),
        ({"JWT_SECRET": "k" * 31}, "too short"),
        ({"JWT_SECRET": SECRET, "RATE_LIMIT": "lots"}, "RATE_LIMIT"),
        ({"JWT_SECRET": SECRET, "PRESENCE_TTL": "x"}, "PRESENCE_TTL"),
        ({"JWT_SECRET": SECRET, "MAX_MESSAGE_BYTES": "10"}, "MAX_MESSAGE_BYTES"),
        ({"JWT_SECRET": SECRET, "REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"JWT_PUBLIC_KEY": "/nonexistent.pem"}, "JWT_PUBLIC_KEY"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


def test_environment_names_are_read() -> None:
    s = Settings.from_env({
        "JWT_SECRET": SECRET, "REDIS_ADDR": "redis:6380", "MAX_MESSAGE_BYTES": "1024",
        "RATE_LIMIT": "5/minute", "MAX_TOKEN_TTL": "60", "PRESENCE_TTL": "3",
        "MAX_DEVICES_PER_USER": "2", "ALLOWED_ORIGINS": "https://a, https://b",
    })
    assert s.redis_url == "redis://redis:6380/0"
    assert (s.max_message_bytes, s.rate_limit, s.max_token_ttl) == (1024, "5/minute", 60)
    assert (s.presence_ttl, s.max_devices_per_user) == (3, 2)
    assert s.allowed_origins == ("https://a", "https://b")
    assert s.heartbeat_interval == 1.0
    assert "k" * 32 not in repr(s)


def test_redis_url_forms() -> None:
    assert redis_url_from({"REDIS_URL": "redis://h:1/2", "REDIS_ADDR": "x:9"}) == "redis://h:1/2"
    assert redis_url_from({"REDIS_ADDR": "localhost:6379"}) == "redis://localhost:6379/0"
    assert redis_url_from({"REDIS_ADDR": "redis"}) == "redis://redis:6379/0"
    assert redis_url_from({}) is None


def test_addr_forms() -> None:
    assert parse_addr(":8080") == ("0.0.0.0", 8080)
    assert parse_addr("127.0.0.1:9") == ("127.0.0.1", 9)
    assert parse_addr("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ValueError):
        parse_addr("8080")
