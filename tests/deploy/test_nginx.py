"""config/nginx.conf for real: Debian's nginx runs this very file (only the upstream hosts,
the listen address, the pid file and temp paths substituted) in front of the two live
instances; WebSockets connect through it, land on both instances without any stickiness,
and reach each other; and nginx prints no client address or token, even when an upstream
fails (which nginx reports at level "error", with the client's address)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import LiveCluster, connect_ws, recv_until, send
from tests.deploy.tools import ROOT, missing_tool
from tests.support import free_port, http_get

pytestmark = pytest.mark.deploy

CONF = ROOT / "config" / "nginx.conf"


@dataclass
class Nginx:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def output(self) -> str:
        return (self.workdir / "stderr.txt").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful stop
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def nginx_exe() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    missing_tool("nginx", "apt-get install --no-install-recommends nginx")
    raise AssertionError("unreachable")


def local_config(upstreams: tuple[int, int], port: int, workdir: Path,
                 error_level: str | None = None) -> str:
    text = CONF.read_text()
    temp = "".join(f"\n    {kind}_temp_path {workdir / kind};"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    swaps = [
        ("server signaling-1:8080 ", f"server 127.0.0.1:{upstreams[0]} "),
        ("server signaling-2:8080 ", f"server 127.0.0.1:{upstreams[1]} "),
        ("listen 8080;", f"listen 127.0.0.1:{port};"),
        ("pid /tmp/nginx.pid;", f"pid {workdir / 'nginx.pid'};"),
        ("\nhttp {", "\nhttp {" + temp),
    ]
    if error_level:
        swaps.append(("error_log stderr alert;", f"error_log stderr {error_level};"))
    for old, new in swaps:
        assert text.count(old) == 1, f"config/nginx.conf changed: {old!r} not found once"
        text = text.replace(old, new)
    return text


def start_nginx(upstreams: tuple[int, int], workdir: Path,
                error_level: str | None = None) -> Nginx:
    exe = nginx_exe()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(local_config(upstreams, port, workdir, error_level))
    base = [exe, "-e", "stderr", "-p", str(workdir), "-c", str(conf)]
    check = subprocess.run(base + ["-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    with open(workdir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(base + ["-g", "daemon off;"], stdout=err,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Nginx(port, proc, workdir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited:\n{server.output()}")
        with contextlib.suppress(OSError):
            if http_get(f"{server.http}/lb-health")[0] == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"nginx did not answer:\n{server.output()}")


@pytest.fixture(scope="module")
def nginx(live_cluster: LiveCluster, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[Nginx]:
    a, b = live_cluster.servers
    server = start_nginx((a.port, b.port), tmp_path_factory.mktemp("nginx"))
    try:
        yield server
    finally:
        server.stop()


def test_http_through_the_balancer(nginx: Nginx) -> None:
    assert http_get(f"{nginx.http}/lb-health") == (200, "ok\n")
    for path in ("/health", "/ready"):
        status, body = http_get(nginx.http + path)
        assert status == 200, (path, body)
    # metrics are scraped per instance, never through the balancer
    assert http_get(f"{nginx.http}/metrics")[0] == 404


def test_websockets_spread_over_both_instances_and_reach_each_other(nginx: Nginx) -> None:
    with contextlib.ExitStack() as stack:
        by_node: dict[str, list[tuple[object, str]]] = {}
        for i in range(4):
            ws, welcome = connect_ws(stack, nginx.ws_url, f"lb-user-{i}", "d")
            node = str(welcome["connection_id"]).split(".", 1)[0]
            by_node.setdefault(node, []).append((ws, str(welcome["user_id"])))
        assert len(by_node) == 2, f"all connections on one instance: {list(by_node)}"
        (src, _), (dst, dst_user) = (clients[0] for clients in by_node.values())
        send(src, type="offer", to=dst_user, payload={"sdp": "via-lb"}, id="lb1")
        ack = recv_until(src, lambda m: m.get("id") == "lb1")
        assert (ack["type"], ack["devices"]) == ("ack", 1), ack
        got = recv_until(dst, lambda m: m.get("type") == "offer")
        assert got["payload"] == {"sdp": "via-lb"}


def test_nginx_logs_nothing_about_clients(nginx: Nginx) -> None:
    http_get(f"{nginx.http}/ws?token=SECRET-TOKEN-VALUE")
    http_get(f"{nginx.http}/missing?token=SECRET-TOKEN-VALUE")
    time.sleep(0.2)
    out = nginx.output()
    assert "127.0.0.1" not in out and "SECRET-TOKEN-VALUE" not in out, out
    assert not list(nginx.workdir.glob("**/*.log")), "nginx wrote a log file"


def test_failing_upstream_is_not_logged_with_the_client(live_cluster: LiveCluster,
                                                        tmp_path: Path) -> None:
    """One upstream is down: requests still succeed (the other instance answers), and
    nginx's "connect() failed … client: <address>, request: …" line, which it writes at
    level "error", does not appear with the configured level — but does with "error"
    (so this test would see a leak)."""
    dead = free_port()
    outputs = {}
    for level in (None, "error"):
        server = start_nginx((live_cluster.servers[0].port, dead), tmp_path / str(level), level)
        try:
            for _ in range(4):
                status, _ = http_get(f"{server.http}/health?token=SECRET-TOKEN-VALUE")
                assert status == 200
            time.sleep(0.2)
            outputs[level] = server.output()
        finally:
            server.stop()
    assert "client: 127.0.0.1" in outputs["error"], outputs["error"]
    assert "SECRET-TOKEN-VALUE" in outputs["error"]
    assert "127.0.0.1" not in outputs[None] and "SECRET-TOKEN-VALUE" not in outputs[None]
