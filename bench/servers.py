"""Starting and stopping the servers under test: ours (``sanic service.app``, through the
helpers of ``tests/support.py``), the PeerJS server and the socket.io servers
(``bench/peers``), and a private redis-server.  Every start can be pinned to a CPU set
(the processes inherit the mask of the bench process at fork time)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_py

from bench.procstat import pinned
from tests.support import (
    SECRET,
    RedisServer,
    ServerProcess,
    free_port,
    server_env,
    start_redis,
    start_server,
)

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"


@dataclass
class Servers:
    """What a scenario runs against: the instances' (host, port), the pids whose process
    trees are the server (CPU, RSS), and the pid of redis-server (CPU) if any."""

    kind: str
    targets: list[tuple[str, int]]
    server_pids: list[int]
    redis: RedisServer | None = None
    _stops: list[object] = field(default_factory=list, repr=False)
    logs: list[Path] = field(default_factory=list)

    @property
    def redis_pids(self) -> list[int]:
        return [self.redis.proc.pid] if self.redis else []

    def redis_commands(self) -> CommandStats | None:
        """Redis's own count of each command so far (``INFO commandstats``); None without
        a Redis.  Two of them, taken at the measured window's edges, make
        ``commands_delta``."""
        if self.redis is None:
            return None
        with redis_py.Redis(port=self.redis.port) as client:
            info = client.info("commandstats")  # {"cmdstat_<name>": {"calls": N, "usec": N, ...}}
        return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for name, v in info.items()}

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(p.read_text(errors="replace")[-n:] for p in self.logs if p.exists())

    def stop(self) -> None:
        for s in self._stops:
            if isinstance(s, ServerProcess):
                s.stop()
            elif isinstance(s, subprocess.Popen):
                _stop_popen(s)
        if self.redis is not None:
            self.redis.stop()
            shutil.rmtree(self.redis.dir, ignore_errors=True)


CommandStats = dict[str, tuple[int, int]]  # command -> (calls, microseconds)


def commands_delta(before: CommandStats, after: CommandStats) -> dict[str, dict[str, int]]:
    """What Redis ran between two ``Servers.redis_commands``: calls and microseconds (Redis's wall
    clock: on a shared core it includes time the server waited for the CPU) of each
    command it ran at all, by name."""
    out: dict[str, dict[str, int]] = {}
    for name, (calls, usec) in sorted(after.items()):
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            out[name] = {"calls": calls - calls0, "usec": usec - usec0}
    return out


def _stop_popen(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _redis(cpus: set[int] | None) -> RedisServer:
    with pinned(cpus):
        return start_redis()


def start_signaling(
    *,
    redis: bool,
    instances: int = 1,
    workers: int = 1,
    cpus: set[int] | None = None,
    extra_env: dict[str, str] | None = None,
    python: str | None = None,
) -> Servers:
    """Our server as production runs it: auth, presence, acks and the cluster-wide rate
    limiter on (its limit raised out of the way).  ``python``: the interpreter to run it
    with (default: the harness's own)."""
    if (instances > 1 or workers > 1) and not redis:
        raise ValueError("more than one process needs Redis")
    rs = _redis(cpus) if redis else None
    env = server_env(
        rs.url if rs else None,
        RATE_LIMIT="1000000/second",
        MAX_DEVICES_PER_USER="10",
        **(extra_env or {}),
    )
    out = Servers("signaling", [], [], rs)
    try:
        for _ in range(instances):
            with pinned(cpus):
                sp = start_server(env, workers=workers, extra_args=["--no-access-logs"],
                                  timeout=60, python=python)
            out._stops.append(sp)
            out.logs.append(sp.log_path)
            out.targets.append(("127.0.0.1", sp.port))
            out.server_pids.append(sp.proc.pid)
            _wait_log(sp, "Worker ready", workers, 60)
    except BaseException:
        out.stop()
        raise
    return out


def _wait_log(sp: ServerProcess, needle: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sp.log().count(needle) >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"only {sp.log().count(needle)} of {count} workers ready")


def secret() -> str:
    return SECRET


def npm_install() -> None:
    """Install the peers from the npm registry (package-lock.json) when missing."""
    if (PEERS / "node_modules" / ".package-lock.json").exists():
        return
    cmd = ["npm", "ci"] if (PEERS / "package-lock.json").exists() else ["npm", "install"]
    subprocess.run([*cmd, "--no-audit", "--no-fund"], cwd=PEERS, check=True)


def _node(args: list[str], port: int, cpus: set[int] | None, env: dict[str, str]) -> tuple[
        subprocess.Popen[bytes], Path]:
    if shutil.which("node") is None:
        raise RuntimeError("node is not installed")
    return _spawn(["node", *args], PEERS, port, cpus, env)


def _spawn(cmd: list[str], cwd: Path, port: int, cpus: set[int] | None,
           env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``cmd`` pinned to ``cpus`` and wait until it listens on ``port``."""
    log = Path(tempfile.mkstemp(prefix="bench-peer-", suffix=".log")[1])
    with pinned(cpus), open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, log
        time.sleep(0.1)
    _stop_popen(proc)
    raise RuntimeError(f"{cmd[0]} did not listen on {port}: {log.read_text()[-2000:]}")


def start_peerjs(cpus: set[int] | None = None) -> Servers:
    """The PeerJS server (npm ``peer``), single instance, its concurrent limit raised."""
    npm_install()
    port = free_port()
    proc, log = _node(
        ["node_modules/peer/dist/bin/peerjs.js", "--port", str(port), "--host", "127.0.0.1",
         "-c", "1000000"],
        port, cpus, {},
    )
    out = Servers("peerjs", [("127.0.0.1", port)], [proc.pid])
    out._stops.append(proc)
    out.logs.append(log)
    return out


def start_floor(cpus: set[int] | None = None) -> Servers:
    """``bench/floor.py``: a bare relay on the PeerJS wire, the measuring stick of what the
    interpreter and the kernel cost per message without any feature."""
    port = free_port()
    proc, log = _spawn([python(), "-m", "bench.floor", str(port)], ROOT, port, cpus, {})
    out = Servers("python-floor", [("127.0.0.1", port)], [proc.pid])
    out._stops.append(proc)
    out.logs.append(log)
    return out


def start_socketio(instances: int = 2, cpus: set[int] | None = None) -> Servers:
    """socket.io 4 instances on one Redis with ``@socket.io/redis-streams-adapter``."""
    npm_install()
    rs = _redis(cpus)
    out = Servers("socketio", [], [], rs)
    try:
        for _ in range(instances):
            port = free_port()
            proc, log = _node(["socketio-server.js"], port, cpus,
                              {"PORT": str(port), "REDIS_URL": rs.url})
            out._stops.append(proc)
            out.logs.append(log)
            out.targets.append(("127.0.0.1", port))
            out.server_pids.append(proc.pid)
    except BaseException:
        out.stop()
        raise
    return out


def python() -> str:
    return sys.executable
