"""``signaling-server`` (the original's flags, single-dash spellings too) and
``signaling-token`` (the original's auth helper).

``signaling-server`` turns its flags into the environment variables of PROTOCOL.md §11
(flags win), validates the settings so a mistake fails here with one clear line, then
``exec``s ``python -m sanic service.app`` — the very same path as ``sanic service.app``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, Settings


def _flag(parser: argparse.ArgumentParser, name: str, **kw: object) -> None:
    """Accept ``--name`` and the Go-style ``-name``."""
    parser.add_argument(f"-{name}", f"--{name}", **kw)  # type: ignore[arg-type]


def parse_addr(addr: str) -> tuple[str, int]:
    """``:8080`` -> ("0.0.0.0", 8080); ``host:port``; ``[::1]:8080``."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise ValueError(f"--addr must be HOST:PORT or :PORT, got {addr!r}")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--addr has no valid port: {addr!r}")
    return host, int(port)


def server_argv(args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """Apply the flags to ``env`` and return the argv that starts Sanic."""
    if args.redis:
        key = "REDIS_URL" if "://" in args.redis else "REDIS_ADDR"
        env.pop("REDIS_URL" if key == "REDIS_ADDR" else "REDIS_ADDR", None)
        env[key] = args.redis
    if args.jwt_secret:
        env["JWT_SECRET"] = args.jwt_secret
    if args.verbose:
        env["VERBOSE"] = "1"
    host, port = parse_addr(args.addr)
    argv = [sys.executable, "-m", "sanic", "service.app", "--host", host, "--port", str(port)]
    argv += ["--workers", str(args.workers), "--no-access-logs"]
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise ValueError("--cert and --key go together")
        argv += ["--cert", args.cert, "--key", args.key]
    return argv


def server_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="signaling-server",
        description="Liberty Reach signaling server (Sanic + Redis Streams).",
    )
    _flag(parser, "addr", default=os.environ.get("ADDR", ":8080"), help="HOST:PORT (:8080)")
    _flag(parser, "redis", default=None, help="Redis URL or host:port (env REDIS_URL/REDIS_ADDR)")
    _flag(parser, "jwt-secret", default=None, help="HS256 secret (prefer env JWT_SECRET)")
    _flag(parser, "cert", default=None, help="TLS certificate file")
    _flag(parser, "key", default=None, help="TLS key file")
    _flag(parser, "workers", type=int, default=int(os.environ.get("WORKERS", "1")),
          help="worker processes (more than one needs Redis)")
    _flag(parser, "verbose", action="store_true", help="debug logging (never tokens or IPs)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        cmd = server_argv(args, env)
        settings = Settings.from_env(env)
    except (ConfigError, ValueError) as exc:
        print(f"signaling-server: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.workers < 1:
        print("signaling-server: error: --workers must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    if args.workers > 1 and settings.redis_url is None:
        print(
            f"signaling-server: error: {args.workers} workers need a shared backplane: "
            "pass --redis (or set REDIS_URL), or run one worker",
            file=sys.stderr,
        )
        raise SystemExit(2)
    os.execvpe(cmd[0], cmd, env)


def token_main(argv: Sequence[str] | None = None) -> None:
    from .auth import mint

    parser = argparse.ArgumentParser(prog="signaling-token", description="Print a signed JWT.")
    _flag(parser, "user", required=True, help="user_id claim")
    _flag(parser, "device", required=True, help="device_id claim")
    _flag(parser, "ttl", type=int, default=3600, help="seconds until exp (3600)")
    _flag(parser, "secret", default=None, help="HS256 secret (default: env JWT_SECRET)")
    _flag(parser, "rooms", default=None, help="comma-separated rooms claim (prefix*)")
    _flag(parser, "private-key", default=None, help="PEM private key file (RS256/ES256/EdDSA)")
    _flag(parser, "alg", default=None, help="algorithm (HS256, or RS256/ES256/EdDSA with a key)")
    args = parser.parse_args(argv)
    rooms = [r for r in args.rooms.split(",") if r] if args.rooms is not None else None
    if args.private_key:
        key = Path(args.private_key).read_text()
        alg = args.alg or "RS256"
    else:
        key = args.secret or os.environ.get("JWT_SECRET", "")
        alg = args.alg or "HS256"
        if not key:
            print("signaling-token: error: give --secret or set JWT_SECRET", file=sys.stderr)
            raise SystemExit(2)
    print(mint(key, args.user, args.device, ttl=args.ttl, rooms=rooms, algorithm=alg))
