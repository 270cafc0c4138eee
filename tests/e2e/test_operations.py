"""Operational end-to-end tests: the two ways to start the server, its configuration and
refusals, the HTTP endpoints (/ready, /metrics across workers), asymmetric JWTs, privacy of
logs and Redis, and surviving a Redis outage.  Message routing semantics live in
test_signaling.py; here routing is only used to prove a setup works."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import (
    ROOT,
    SECRET,
    Client,
    RedisServer,
    ServerProcess,
    free_port,
    http_get,
    running,
    server_env,
    start_redis,
    start_server,
    token,
)

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
SIGNALING_SERVER = str(BIN / "signaling-server")
OTHER_SECRET = "another-secret-abcdefghijklmnopqrstuvwxyz-0123456789"


# ---------------------------------------------------------------------- helpers


async def open_ws(
    url: str,
    tok: str | None = None,
    *,
    carrier: str = "query",
) -> Client:
    """Connect with ``tok`` in the given carrier (query, header, subprotocol); welcome first."""
    kw: dict[str, Any] = {"open_timeout": 10}
    target = url
    if carrier == "query":
        target = f"{url}?token={tok}"
    elif carrier == "header":
        kw["additional_headers"] = {"Authorization": f"Bearer {tok}"}
    elif carrier == "subprotocol":
        kw["subprotocols"] = ["signaling.v1", f"bearer.{tok}"]
    else:  # pragma: no cover - test bug
        raise ValueError(carrier)
    ws = await websockets.connect(target, **kw)
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome", welcome
    return Client(ws, welcome)


async def refused(
    url: str,
    tok: str | None = None,
    *,
    carrier: str = "query",
    query: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """An upgrade that must be answered before the handshake: (status, JSON body)."""
    kw: dict[str, Any] = {"open_timeout": 10}
    target = url
    if query is not None:
        target = f"{url}?{query}"
    elif carrier == "query" and tok is not None:
        target = f"{url}?token={tok}"
    elif carrier == "header":
        kw["additional_headers"] = {"Authorization": f"Bearer {tok}"}
    try:
        ws = await websockets.connect(target, **kw)
    except InvalidStatus as exc:
        return exc.response.status_code, json.loads(exc.response.body or b"{}")
    await ws.close()
    raise AssertionError("the upgrade was accepted but should have been refused")


async def open_spread(url: str, prefix: str, per_node: int = 2, limit: int = 62) -> list[Client]:
    """Open connections of distinct users until two workers hold ``per_node`` each (bounded).

    They open in concurrent bursts of growing size: the workers share one listening socket,
    and one of two idle workers can win every accept of connections that arrive a few at a
    time (measured here: 40 in a row after a Redis restart), while 16 at once reach both."""
    clients: list[Client] = []
    nodes: dict[str, int] = {}
    burst = 2
    while len(clients) < limit:
        start = len(clients)
        clients += await asyncio.gather(
            *(open_ws(url, token(f"{prefix}-{i}", "dev")) for i in range(start, start + burst))
        )
        nodes = {}
        for c in clients:
            nodes[c.node] = nodes.get(c.node, 0) + 1
        if len(nodes) >= 2 and sorted(nodes.values())[-2] >= per_node:
            return clients
        burst = min(2 * burst, 16)
        await asyncio.sleep(0.1)
    for c in clients:
        await c.close()
    raise AssertionError(f"{len(clients)} connections never reached two workers: {nodes}")


def by_node(clients: list[Client]) -> tuple[list[Client], list[Client]]:
    nodes = sorted({c.node for c in clients})
    assert len(nodes) == 2, nodes
    return [c for c in clients if c.node == nodes[0]], [c for c in clients if c.node == nodes[1]]


async def offer_ok(src: Client, dst: Client, msg_id: str, payload: Any) -> None:
    """``src`` sends an offer with an id to ``dst``'s user: ack devices=1, delivered intact."""
    await src.send(type="offer", to=dst.welcome["user_id"], payload=payload, id=msg_id)
    ack = await src.recv(5)
    assert ack == {"type": "ack", "id": msg_id, "devices": 1}, ack
    got = await dst.recv_type("offer", 5)
    assert got["from"] == src.welcome["user_id"], got
    assert got["from_device"] == src.welcome["device_id"], got
    assert got["payload"] == payload, got
    assert got["id"] == msg_id, got


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def scrape(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = server.get("/metrics")
    assert status == 200, body
    return parse_metrics(body)


def wait_until(check: Any, timeout: float, interval: float = 0.1) -> Any:
    """Poll ``check()`` until it returns a truthy value; return the last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = check()
    return value


def steady(check: Any, times: int, timeout: float) -> bool:
    """True once ``check()`` held ``times`` times in a row (every worker may answer one of
    them) before ``timeout``."""
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if check() else 0
        if streak >= times:
            return True
        time.sleep(0.05)
    return False


def redis_dump(redis: RedisServer) -> str:
    """Every key of the Redis instance with its whole value, as text."""
    out = []
    for key in redis.cli("--scan").split():
        kind = redis.cli("TYPE", key).strip()
        value = {
            "string": ("GET", key),
            "hash": ("HGETALL", key),
            "list": ("LRANGE", key, "0", "-1"),
            "set": ("SMEMBERS", key),
            "zset": ("ZRANGE", key, "0", "-1", "WITHSCORES"),
            "stream": ("XRANGE", key, "-", "+"),
        }.get(kind)
        out.append(f"{key} ({kind}): {redis.cli(*value) if value else ''}")
        if kind == "stream":
            out.append(redis.cli("XINFO", "GROUPS", key))
    return "\n".join(out)


def settle(server: ServerProcess, workers: int = 1) -> ServerProcess:
    """Wait until Sanic's main process has seen every worker's ack: a SIGTERM that arrives
    before that leaves it stuck in WorkerManager.wait_for_ack (see the module report)."""
    assert wait_until(lambda: server.log().count("Worker ready") >= workers, 10), server.log()
    time.sleep(0.3)
    return server


@contextlib.contextmanager
def served(env: dict[str, str], **kw: Any) -> Iterator[ServerProcess]:
    """``running`` plus :func:`settle`, so that stopping is not raced against start-up."""
    with running(env, **kw) as server:
        yield settle(server, kw.get("workers", 1))


def launch(cmd: list[str], env: dict[str, str], port: int, timeout: float = 20) -> ServerProcess:
    """Start an arbitrary server command line and wait for /ready on ``port``."""
    log_path = Path(tempfile.mkstemp(prefix="sig-server-", suffix=".log")[1])
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(port, proc, log_path, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if server.get("/ready")[0] == 200:
                return settle(server)
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server did not become ready:\n{server.log()[-3000:]}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A hand-built JWT: HS256 over ``key``, or no signature at all when ``key`` is None."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def claims(user: str, device: str, ttl: int = 600) -> dict[str, Any]:
    now = int(time.time())
    return {"user_id": user, "device_id": device, "iat": now, "exp": now + ttl}


# ---------------------------------------------------------------------- 1. --workers 2


async def test_sanic_two_workers_route_and_metrics_cover_all_workers(redis_url: str) -> None:
    with served(server_env(redis_url), workers=2) as server:
        clients = await open_spread(server.ws_url, "mw", per_node=2)
        try:
            left, right = by_node(clients)
            pairs = [(left[0], right[0]), (right[0], left[0]), (left[1], right[1]),
                     (right[1], left[1])]
            for i, (src, dst) in enumerate(pairs):
                await offer_ok(src, dst, f"x{i}", {"sdp": f"v=0 cross {i}", "type": "offer"})
            offers = len(pairs)
            n = len(clients)
            # counters reach Prometheus within metrics.FLUSH_S of the traffic, per worker
            wait_until(lambda: metric(scrape(server), "signaling_messages_sent_total")
                       >= n + 2 * offers, 3)
            wait_until(lambda: metric(scrape(server), "signaling_messages_received_total",
                                      type="offer") >= offers, 3)
            for _ in range(6):  # each scrape is a new connection: any worker may answer
                samples = scrape(server)
                assert metric(samples, "signaling_active_connections") == n
                assert metric(samples, "signaling_messages_received_total", type="offer") == offers
                others = sum(
                    v for (name, labels), v in samples.items()
                    if name == "signaling_messages_received_total"
                    and ("type", "offer") not in labels
                )
                assert others == 0
                # welcome per connection, then one delivery and one ack per offer
                assert metric(samples, "signaling_messages_sent_total") == n + 2 * offers
        finally:
            for c in clients:
                await c.close()

        def settled() -> bool:
            s = scrape(server)
            return (metric(s, "signaling_active_connections") == 0
                    and metric(s, "signaling_connection_duration_seconds_count") == n)

        assert wait_until(settled, 5), scrape(server)


# ---------------------------------------------------------------------- 2. signaling-server


async def test_cli_single_dash_flags_host_port_redis(redis_server: RedisServer,
                                                     redis_url: str) -> None:
    env = server_env(None)
    env.pop("JWT_SECRET")
    args = ["-redis", f"127.0.0.1:{redis_server.port}", "-jwt-secret", OTHER_SECRET]
    with served(env, cli=True, extra_args=args) as server:
        status, body = server.get("/ready")
        assert status == 200
        assert json.loads(body)["backplane"] == "redis"
        c = await open_ws(server.ws_url, token("cli-u1", "d1", secret=OTHER_SECRET))
        try:
            assert c.welcome["user_id"] == "cli-u1"
            assert "sig:dev:cli-u1" in redis_server.cli("KEYS", "*").split()
            status, err = await refused(server.ws_url, token("cli-u2", "d1"))  # env default
            assert (status, err["error"]) == (401, "invalid_token")
        finally:
            await c.close()


async def test_cli_double_dash_flags_win_over_environment(redis_server: RedisServer,
                                                          redis_url: str) -> None:
    port = free_port()
    # the environment points at a dead Redis and another secret: the flags must win
    env = server_env("redis://127.0.0.1:1/0", JWT_SECRET=SECRET)
    cmd = [SIGNALING_SERVER, "--addr", f"127.0.0.1:{port}", "--redis", redis_url,
           "--jwt-secret", OTHER_SECRET, "--workers", "1"]
    server = launch(cmd, env, port)
    try:
        status, body = server.get("/ready")
        assert (status, json.loads(body)["backplane"]) == (200, "redis")
        c = await open_ws(server.ws_url, token("dd-u1", "d1", secret=OTHER_SECRET))
        try:
            assert c.welcome["device_id"] == "d1"
            assert "sig:dev:dd-u1" in redis_server.cli("KEYS", "*").split()
        finally:
            await c.close()
        status, err = await refused(server.ws_url, token("dd-u2", "d1", secret=SECRET))
        assert (status, err["error"]) == (401, "invalid_token")
    finally:
        server.stop()


# ---------------------------------------------------------------------- 3. start-up refusals

SHORT_SECRET = "x" * 31  # one byte short of the minimum


def _sanic_cmd(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "sanic", "service.app", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers)]


def _cli_cmd(port: int, workers: int) -> list[str]:
    return [SIGNALING_SERVER, "-addr", f"127.0.0.1:{port}", "-workers", str(workers)]


@pytest.mark.parametrize(
    ("command", "workers", "jwt_secret", "extra", "expected"),
    [
        ("sanic", 1, None, [], "JWT_SECRET is not set"),
        ("cli", 1, None, [], "JWT_SECRET is not set"),
        ("sanic", 1, SHORT_SECRET, [], "JWT_SECRET is too short (31 bytes)"),
        ("cli", 1, None, ["-jwt-secret", SHORT_SECRET], "JWT_SECRET is too short (31 bytes)"),
        ("sanic", 2, SECRET, [], "2 workers need a shared backplane"),
        ("cli", 2, SECRET, [], "2 workers need a shared backplane"),
    ],
    ids=["sanic-no-secret", "cli-no-secret", "sanic-short-secret", "cli-short-secret",
         "sanic-workers-no-redis", "cli-workers-no-redis"],
)
def test_start_is_refused_with_a_clear_message(
    command: str, workers: int, jwt_secret: str | None, extra: list[str], expected: str
) -> None:
    env = server_env(None)
    env.pop("JWT_SECRET")
    if jwt_secret is not None:
        env["JWT_SECRET"] = jwt_secret
    port = free_port()
    cmd = (_sanic_cmd if command == "sanic" else _cli_cmd)(port, workers) + extra
    try:
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{command} did not refuse to start: {exc.stdout!r}") from None
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert expected in output, output
    assert "Traceback" not in output, output
    with pytest.raises(OSError):  # nothing is left listening
        http_get(f"http://127.0.0.1:{port}/health")


async def test_no_redis_one_worker_runs_single_instance_in_process() -> None:
    secret = "s" * 32  # exactly the minimum is accepted
    with served(server_env(None, JWT_SECRET=secret)) as server:
        status, body = server.get("/ready")
        assert status == 200
        ready = json.loads(body)
        assert (ready["status"], ready["backplane"]) == ("ready", "memory")
        c = await open_ws(server.ws_url, token("solo", "d1", secret=secret))
        await c.send(type="ping", id="p")
        assert (await c.recv())["type"] == "pong"
        await c.close()
        log = server.log()
    said = [line for line in log.splitlines() if re.search(r"single[- ]instance", line)]
    assert said and "in-process backplane" in said[0], log


# ---------------------------------------------------------------------- 4. environment names


async def test_environment_names_are_honoured(redis_server: RedisServer, redis_url: str) -> None:
    env = server_env(
        None,
        REDIS_ADDR=f"127.0.0.1:{redis_server.port}",
        MAX_MESSAGE_BYTES="1024",
        RATE_LIMIT="7/minute",
        MAX_TOKEN_TTL="60",
        MAX_DEVICES_PER_USER="2",
    )
    with served(env) as server:
        status, body = server.get("/ready")
        assert (status, json.loads(body)["backplane"]) == (200, "redis")

        # MAX_TOKEN_TTL
        status, err = await refused(server.ws_url, token("env-a", "d1", ttl=600))
        assert (status, err["error"]) == (401, "token_lifetime_too_long")
        a1 = await open_ws(server.ws_url, token("env-a", "d1", ttl=50))
        # REDIS_ADDR: presence went to that Redis
        assert "sig:dev:env-a" in redis_server.cli("KEYS", "*").split()
        # RATE_LIMIT
        assert a1.welcome["rate_limit"] == {"limit": 7, "period_s": 60}
        # MAX_DEVICES_PER_USER
        a2 = await open_ws(server.ws_url, token("env-a", "d2", ttl=50))
        status, err = await refused(server.ws_url, token("env-a", "d3", ttl=50))
        assert (status, err["error"]) == (429, "too_many_devices")
        for i in range(7):
            await a1.send(type="ping", id=f"p{i}")
            assert (await a1.recv())["type"] == "pong"
        await a2.send(type="ping", id="p7")  # the same user: the budget is shared
        limited = await a2.recv()
        assert (limited["type"], limited["code"], limited["id"]) == ("error", "rate_limited", "p7")
        assert limited["retry_after_ms"] > 0

        # MAX_MESSAGE_BYTES: just under passes, just over closes with 1009
        b = await open_ws(server.ws_url, token("env-b", "d1", ttl=50))
        under = json.dumps({"type": "offer", "to": "env-nobody", "payload": "p" * 900})
        assert len(under) <= 1024
        await b.send_raw(under)
        assert (await b.recv())["code"] == "peer_offline"
        await b.send_raw(json.dumps({"type": "ping", "payload": "q" * 1100}))
        with pytest.raises(ConnectionClosed) as closed:
            await b.recv(5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await a1.close()
        await a2.close()


# ---------------------------------------------------------------------- 5. asymmetric JWT


def _keypair(kind: str) -> tuple[str, str]:
    if kind == "RS256":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_asymmetric_jwt(alg: str, tmp_path: Path) -> None:
    private, public = _keypair(alg)
    stranger, _ = _keypair(alg)
    other_alg = "ES256" if alg != "ES256" else "RS256"
    other_private, _ = _keypair(other_alg)
    key_file = tmp_path / "jwt.pub.pem"
    key_file.write_text(public)
    env = server_env(None, JWT_PUBLIC_KEY=str(key_file))
    env.pop("JWT_SECRET")
    with served(env) as server:
        good = jwt.encode(claims("asym-u", "d1"), private, algorithm=alg)
        c = await open_ws(server.ws_url, good)
        assert (c.welcome["user_id"], c.welcome["device_id"]) == ("asym-u", "d1")
        await c.close()
        c = await open_ws(server.ws_url, good, carrier="header")
        await c.close()

        bad = {
            # key confusion: HS256 with the public key's PEM text as the HMAC secret
            "hs256-public-pem": forged({"alg": "HS256", "typ": "JWT"}, claims("asym-u", "d2"),
                                       public.encode()),
            "alg-none": forged({"alg": "none", "typ": "JWT"}, claims("asym-u", "d3"), None),
            "other-key": jwt.encode(claims("asym-u", "d4"), stranger, algorithm=alg),
            "other-alg": jwt.encode(claims("asym-u", "d5"), other_private, algorithm=other_alg),
            "hs256-secret": token("asym-u", "d6"),
        }
        for name, tok in bad.items():
            status, err = await refused(server.ws_url, tok)
            assert (status, err.get("error"), name) == (401, "invalid_token", name), err


async def test_issuer_and_audience() -> None:
    env = server_env(None, JWT_ISSUER="https://issuer.example", JWT_AUDIENCE="signaling")
    with served(env) as server:
        iss, aud = "https://issuer.example", "signaling"
        wrong = {
            "none": token("ia", "d1"),
            "no-aud": token("ia", "d1", iss=iss),
            "no-iss": token("ia", "d1", aud=aud),
            "wrong-iss": token("ia", "d1", iss="https://evil.example", aud=aud),
            "wrong-aud": token("ia", "d1", iss=iss, aud="other-service"),
        }
        for name, tok in wrong.items():
            status, err = await refused(server.ws_url, tok)
            assert (status, err.get("error"), name) == (401, "invalid_token", name), err
        c = await open_ws(server.ws_url, token("ia", "d1", iss=iss, aud=aud))
        assert c.welcome["user_id"] == "ia"
        await c.close()


# ---------------------------------------------------------------------- 6. privacy

MARK = "PAYLOAD-MARK-7f3c9e"


def _raw_http(port: int, method: str, path: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"x" if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


async def _privacy_scenario(server: ServerProcess) -> list[str]:
    """Exercise every logging path with tokens, addresses and payloads; return the tokens."""
    url = server.ws_url
    tokens: list[str] = []

    def tok(user: str, device: str, **kw: Any) -> str:
        t = token(user, device, **kw)
        tokens.append(t)
        return t

    a = await open_ws(url, tok("priv-alice", "phone"))
    b: Client | None = None
    for i in range(12):  # bob on the other worker, so the payload crosses Redis
        b = await open_ws(url, tok("priv-bob", f"laptop{i}"), carrier="header")
        if b.node != a.node:
            break
        await b.close()
    assert b is not None
    c = await open_ws(url, tok("priv-carol", "tablet"), carrier="subprotocol")
    assert c.ws.subprotocol == "signaling.v1"

    await offer_ok(a, b, "m1", {"sdp": f"v=0 {MARK}", "type": "offer"})
    await b.send(type="answer", to="priv-alice", payload=f"{MARK}-answer")
    assert (await a.recv_type("answer"))["payload"] == f"{MARK}-answer"
    await c.send(type="candidate", to="priv-bob", payload={"candidate": f"{MARK}-cand"})
    assert (await b.recv_type("candidate"))["payload"] == {"candidate": f"{MARK}-cand"}

    # refused upgrades
    expired = tok("priv-dave", "d", ttl=-30)
    wrong_sig = tok("priv-dave", "d", secret=OTHER_SECRET)
    for t, carrier, code in [
        ("SECRET123", "query", "invalid_token"),
        ("SECRET123", "header", "invalid_token"),
        (expired, "query", "token_expired"),
        (wrong_sig, "query", "invalid_token"),
        (wrong_sig, "header", "invalid_token"),
    ]:
        status, err = await refused(url, t, carrier=carrier)
        assert (status, err["error"]) == (401, code), err
    status, err = await refused(url, query="token=&x=SECRET123")
    assert (status, err["error"]) == (401, "missing_token")

    # bad frames: each answered, connection stays open
    frames: list[tuple[str | bytes, str]] = [
        (f"\x00{MARK}".encode(), "bad_frame"),
        (f'{{"type": "offer", "to": "priv-bob", "payload": "{MARK}"', "bad_json"),
        (json.dumps({"type": f"nope-{MARK}", "payload": MARK}), "unknown_type"),
        (json.dumps({"type": "offer", "to": "bad user!", "payload": MARK}), "invalid_message"),
        (json.dumps({"type": "offer", "to": "priv-nobody", "payload": MARK, "id": "q"}),
         "peer_offline"),
    ]
    for frame, code in frames:
        await a.send_raw(frame)
        err = await a.recv_type("error")
        assert err["code"] == code, (frame, err)
    # oversize: 1009
    d = await open_ws(url, tok("priv-erin", "d"))
    await d.send_raw(json.dumps({"type": "offer", "to": "priv-bob", "payload": MARK * 400}))
    with pytest.raises(ConnectionClosed):
        await d.recv(5)

    # HTTP with secrets in the query string, and handler paths that raise in Sanic
    for path in ["/health?token=SECRET123&x=1", "/ready?token=SECRET123",
                 "/metrics?token=SECRET123", "/nope?token=SECRET123"]:
        assert http_get(server.http + path)[0] in (200, 404), path
    ws_good = tok("priv-frank", "d")
    assert http_get(f"{server.http}/ws?token={ws_good}")[0] == 426  # not an upgrade
    assert _raw_http(server.port, "GET", f"/ws?token={ws_good}",
                     {"Upgrade": "websocket", "Connection": "Upgrade"}) == 400  # no key
    assert _raw_http(server.port, "POST", "/health?token=SECRET123", {}) == 405

    # an abrupt drop (no close frame) and clean closes
    c.ws.transport.abort()
    for client in (a, b):
        await client.close()
    await asyncio.sleep(0.5)
    return tokens


def _assert_private(text: str, tokens: list[str], where: str) -> None:
    for t in tokens:
        assert t not in text, f"a token is in {where}"
        signature = t.rsplit(".", 1)[1]
        assert signature not in text, f"a token signature is in {where}"
    assert "SECRET123" not in text, f"a query-string secret is in {where}"
    assert "127.0.0.1" not in text, f"a client address is in {where}"
    assert "token=ey" not in text and "?token=" not in text, f"a query string is in {where}"


@pytest.mark.parametrize("mode", ["cli-verbose", "sanic-debug"])
async def test_no_token_address_or_payload_in_logs_or_redis(
    mode: str, redis_server: RedisServer, redis_url: str
) -> None:
    env = server_env(redis_url, MAX_MESSAGE_BYTES="4096")
    if mode == "cli-verbose":
        server = start_server(env, cli=True, workers=2, extra_args=["-verbose"])
    else:
        server = start_server(env, workers=2, extra_args=["--debug"])
    settle(server, 2)
    try:
        tokens = await _privacy_scenario(server)
        during = redis_dump(redis_server)
        assert "sig:dev:priv-alice" in during or "sig:node:" in during, during
        _assert_private(during, tokens, "Redis (running)")
    finally:
        server.stop()
    log = server.log()
    # the leaky paths did run: Sanic's error handler logged the failed /ws requests, and
    # (--debug) its access log every request; at -verbose, debug lines are on
    assert "Exception occurred while handling uri" in log, log[-3000:]
    if mode == "sanic-debug":
        assert "/health" in log and "/nope" in log, log[-3000:]
    else:
        assert "DEBUG" in log, log[-3000:]
    _assert_private(log, tokens, "the server log")
    assert MARK not in log, "a payload is in the server log"
    after = redis_dump(redis_server)
    _assert_private(after, tokens, "Redis (after)")
    assert MARK not in after, "a payload is still in Redis after delivery"


# ---------------------------------------------------------------------- 7. Redis outage


async def _reply(client: Client, msg_id: str, timeout: float = 5) -> dict[str, Any]:
    """The ack or error answering ``msg_id`` (older answers are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await client.recv(max(deadline - time.monotonic(), 0.01))
        if msg.get("type") in ("ack", "error") and msg.get("id") == msg_id:
            return msg


@pytest.fixture
def private_redis() -> Iterator[list[RedisServer]]:
    """A Redis of this test's own (it gets stopped and restarted); every instance stopped."""
    started = [start_redis()]
    try:
        yield started
    finally:
        for r in started:
            r.stop()


async def test_ready_follows_redis_outage_and_recovery(private_redis: list[RedisServer]) -> None:
    redis = private_redis[0]
    with served(server_env(redis.url), workers=2) as server:
        clients = await open_spread(server.ws_url, "out", per_node=1)
        left, right = by_node(clients)
        a, b = left[0], right[0]
        await offer_ok(a, b, "before", {"sdp": "before"})

        redis.stop()

        def ready_is(status: int) -> bool:
            got, body = server.get("/ready")
            if got == 503:
                assert json.loads(body)["status"] != "ready", body
            return got == status

        assert steady(lambda: ready_is(503), 6, 5), "/ready is not 503 5 s after Redis stopped"
        for _ in range(4):
            assert server.get("/health")[0] == 200
        status, err = await refused(server.ws_url, token("out-new", "d1"))
        assert (status, err["error"]) == (503, "unavailable")

        private_redis.append(start_redis(port=redis.port))
        assert steady(lambda: ready_is(200), 6, 10), "/ready is not 200 10 s after Redis is back"

        # the connections that lived through the outage reach each other again, and new
        # connections (accepted once /ready is back) reach each other across workers
        deadline = time.monotonic() + 12
        fresh = await open_spread(server.ws_url, "back", per_node=1)
        l2, r2 = by_node(fresh)
        await deliver_eventually(a, b, "old", deadline)
        await deliver_eventually(l2[0], r2[0], "fresh", deadline)
        for c in clients + fresh:
            await c.close()


async def deliver_eventually(src: Client, dst: Client, tag: str, deadline: float) -> int:
    """Offer ``src`` -> ``dst`` until one is acked (devices=1) and then delivered; every
    ack must mean a delivery.  Returns the number of attempts."""
    refusals: list[dict[str, Any]] = []
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        msg_id = f"{tag}{attempt}"
        await src.send(type="offer", to=dst.welcome["user_id"], payload={"n": attempt},
                       id=msg_id)
        reply = await _reply(src, msg_id)
        if reply.get("type") == "ack":
            assert reply["devices"] == 1, reply
            got = await dst.recv_type("offer", 5)
            while got.get("id") != msg_id:
                got = await dst.recv_type("offer", 5)
            assert got["payload"] == {"n": attempt}, got
            return attempt
        refusals.append(reply)
        await asyncio.sleep(0.3)
    raise AssertionError(f"{tag}: no delivery after Redis came back: {refusals}")


# ---------------------------------------------------------------------- 8. metric names

ORIGINAL_METRICS = {
    "signaling_active_connections": "gauge",
    "signaling_messages_sent_total": "counter",
    "signaling_messages_received_total": "counter",
    "signaling_rate_limit_exceeded_total": "counter",
    "signaling_connection_duration_seconds": "histogram",
}


async def test_metrics_names_and_no_identifying_labels() -> None:
    users = {"metric-user-alice": "metric-dev-phone", "metric-user-bob": "metric-dev-laptop"}
    with served(server_env(None, RATE_LIMIT="3/minute")) as server:
        alice = await open_ws(server.ws_url, token("metric-user-alice", "metric-dev-phone"))
        bob = await open_ws(server.ws_url, token("metric-user-bob", "metric-dev-laptop"),
                            carrier="header")
        await offer_ok(alice, bob, "m1", {"sdp": "metrics"})
        await alice.send_raw("not json")
        assert (await alice.recv())["code"] == "bad_json"
        await alice.send(type="ping")
        assert (await alice.recv())["type"] == "pong"
        await alice.send(type="ping", id="over")  # fourth message of alice in a minute
        limited = await alice.recv()
        assert (limited["code"], limited["id"]) == ("rate_limited", "over")
        status, _ = await refused(server.ws_url, "SECRET123")
        assert status == 401
        await bob.close()

        def settled() -> bool:
            s = scrape(server)
            return (metric(s, "signaling_active_connections") == 1
                    and metric(s, "signaling_messages_sent_total") >= 7)

        assert wait_until(settled, 5), scrape(server)
        status, text = server.get("/metrics")
        assert status == 200
        await alice.close()

    samples = parse_metrics(text)
    for name, kind in ORIGINAL_METRICS.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert re.search(rf"^# TYPE ({base}|{name}) {kind}$", text, re.M), name
    assert metric(samples, "signaling_active_connections") == 1
    assert metric(samples, "signaling_messages_received_total", type="offer") == 1
    assert metric(samples, "signaling_messages_received_total", type="ping") == 2
    assert metric(samples, "signaling_messages_received_total", type="invalid") == 1
    assert metric(samples, "signaling_rate_limit_exceeded_total") == 1
    # 2 welcomes, offer + ack, bad_json error, pong, rate_limited error
    assert metric(samples, "signaling_messages_sent_total") == 7
    assert metric(samples, "signaling_connection_duration_seconds_count") == 1
    assert metric(samples, "signaling_connection_duration_seconds_bucket", le="+Inf") == 1

    forbidden = [*users, *users.values(), "127.0.0.1", "SECRET123",
                 alice.welcome["connection_id"], bob.welcome["connection_id"]]
    for (name, labels), _ in samples.items():
        for label, value in labels:
            for word in forbidden:
                assert word not in value, f"{name} label {label}={value!r} carries {word!r}"
    for word in forbidden:
        assert word not in text, f"/metrics mentions {word!r}"
