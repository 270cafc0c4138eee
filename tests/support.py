"""Test helpers shared by the suites: a real redis-server on a free port, real server
processes, token minting, a small websocket client wrapper, and a park held back (core and
Redis tests of the park race)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.auth import mint

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def gate_park(hub: Any) -> asyncio.Event:
    """``hub``'s park reaches the store only once the returned event is set: the store says
    "live here" meanwhile, as Redis does during the park's round trip."""
    gate = asyncio.Event()
    park = hub.presence.park

    async def slow_park(*args: Any) -> Any:
        await gate.wait()
        return await park(*args)

    hub.presence.park = slow_park
    return gate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(user: str, device: str, ttl: int = 600, secret: str = SECRET, **kw: Any) -> str:
    return mint(secret, user, device, ttl=ttl, **kw)


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    dir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)


def start_redis(port: int | None = None) -> RedisServer:
    """A private redis-server (never the shared one on 6379), no persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="sig-redis-")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return RedisServer(port, proc, workdir)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@dataclass
class ServerProcess:
    """One real signaling server (``sanic service.app`` or ``signaling-server``)."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.http + path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal the main process and wait; then kill whatever is left of its process
        group (workers orphaned by a SIGKILL, or a main process stuck in Sanic's startup
        handshake when the signal came too early)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return int(self.proc.returncode)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def server_env(redis_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANIC_", "PROMETHEUS_"))}
    for k in ("REDIS_URL", "REDIS_ADDR", "JWT_PUBLIC_KEY", "ALLOWED_ORIGINS"):
        env.pop(k, None)
    env["JWT_SECRET"] = SECRET
    env["PYTHONUNBUFFERED"] = "1"
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


# Every server started by this test process, for the log tails a failed test prints
# (tests/e2e/conftest.py): an end-to-end failure is otherwise hard to read after the fact.
STARTED: list[ServerProcess] = []


def start_server(
    env: dict[str, str],
    *,
    workers: int = 1,
    cli: bool = False,
    extra_args: list[str] | None = None,
    port: int | None = None,
    wait_ready: bool = True,
    timeout: float = 30,
    probe_scheme: str = "http",
    python: str | None = None,
) -> ServerProcess:
    """Start a server and wait until /health answers (and /ready, unless told not to).
    ``python``: another interpreter to run it with (its environment must have this
    package and its dependencies installed); by default this one."""
    python = python or sys.executable
    port = port or free_port()
    log_path = Path(tempfile.mkstemp(prefix="sig-server-", suffix=".log")[1])
    if cli:
        cmd = [str(Path(python).parent / "signaling-server"), "-addr",
               f"127.0.0.1:{port}", "-workers", str(workers)]
    else:
        cmd = [python, "-m", "sanic", "service.app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers)]
    cmd += extra_args or []
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ServerProcess(port, proc, log_path, env)
    STARTED.append(server)
    deadline = time.monotonic() + timeout
    path = "/ready" if wait_ready else "/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        with contextlib.suppress(OSError):
            if probe_scheme == "https":
                status = _probe_https(port, path)
            else:
                status, _ = server.get(path)
            if status == 200:
                return server
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become ready:\n{server.log()[-3000:]}")


def _probe_https(port: int, path: str) -> int:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=2, context=ctx) as r:
        return int(r.status)


@contextlib.contextmanager
def running(env: dict[str, str], **kw: Any) -> Iterator[ServerProcess]:
    server = start_server(env, **kw)
    try:
        yield server
    finally:
        server.stop()


class Client:
    """A websockets client that reads JSON frames with a timeout."""

    def __init__(self, ws: Any, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome

    @property
    def node(self) -> str:
        return str(self.welcome["connection_id"]).split(".", 1)[0]

    async def send(self, **msg: Any) -> None:
        await self.ws.send(json.dumps(msg))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        import asyncio

        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        return dict(json.loads(raw))

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Next frame of ``kind``, skipping others."""
        import asyncio

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            msg = await self.recv(max(left, 0.01))
            if msg.get("type") == kind:
                return msg

    async def nothing(self, timeout: float = 0.3) -> None:
        """Assert that no frame arrives within ``timeout``."""
        import asyncio

        try:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {raw!r}")

    async def close(self) -> None:
        await self.ws.close()


async def connect(url: str, user: str, device: str, **kw: Any) -> Client:
    """Connect with ``?token=`` and return the client after its welcome frame."""
    import websockets

    ws = await websockets.connect(f"{url}?token={token(user, device, **kw)}", open_timeout=10)
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome
    return Client(ws, welcome)


def uid(prefix: str) -> str:
    """A user/room name no other test uses (servers and Redis are shared by a module)."""
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Conns:
    """Opens clients and closes every one of them at the end of the test (the ``conns``
    fixture of tests/e2e/conftest.py)."""

    def __init__(self) -> None:
        self.opened: list[Any] = []

    async def open(self, server: ServerProcess, user: str, device: str = "d1",
                   **kw: Any) -> Client:
        client = await connect(server.ws_url, user, device, **kw)
        self.opened.append(client.ws)
        return client

    def track(self, ws: Any) -> Any:
        self.opened.append(ws)
        return ws

    async def close_all(self) -> None:
        import asyncio

        async def close(ws: Any) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)

        await asyncio.gather(*(close(ws) for ws in self.opened))


async def closed_code(client: Client, timeout: float = 5.0) -> int | None:
    """Read (and drop) frames until the server closes the socket; the close code it sent
    (None when it sent no close frame)."""
    import asyncio

    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout
    try:
        while True:
            await asyncio.wait_for(client.ws.recv(), max(deadline - time.monotonic(), 0.01))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None


async def frames_for(client: Client, seconds: float) -> list[dict[str, Any]]:
    """Every frame that arrives within ``seconds``."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while True:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            return out
        try:
            out.append(await client.recv(left_s))
        except TimeoutError:
            return out
