"""docker-compose.yml without a Docker engine: valid against the Compose specification's
JSON schema (vendored: tests/deploy/compose-spec.json, see tests/deploy/README.md), with
the services, healthchecks and start order it promises, and consistent with the files it
mounts (nginx, Prometheus, Grafana) and with the image."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.deploy.tools import ROOT, env_of, parse_dockerfile

pytestmark = pytest.mark.deploy

COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "deploy" / "compose-spec.json"
NGINX = ROOT / "config" / "nginx.conf"
SIGNALING = ("signaling-1", "signaling-2")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves the <<: merges
    return data


def services() -> dict[str, Any]:
    return dict(compose()["services"])


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with nothing set."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    # it says "http://json-schema.org/draft/2019-09/schema#" (http, not the https id)
    assert "draft/2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_valid_against_the_compose_specification() -> None:
    assert json.loads(SCHEMA.read_text())["title"] == "Compose Specification"
    assert schema_errors(compose()) == []


def test_schema_validation_is_not_vacuous() -> None:
    doc = copy.deepcopy(compose())
    doc["services"]["redis"]["healthchek"] = {"test": ["CMD", "true"]}
    doc["services"]["lb"]["depends_on"]["signaling-1"]["condition"] = "healthy"
    errors = schema_errors(doc)
    assert len(errors) == 2, errors


def test_services_healthchecks_and_start_order() -> None:
    svcs = services()
    assert set(svcs) == {"redis", *SIGNALING, "lb", "prometheus", "grafana"}
    for name, svc in svcs.items():
        test = svc["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    expected_deps = {
        "signaling-1": {"redis"}, "signaling-2": {"redis"},
        "lb": set(SIGNALING), "prometheus": set(SIGNALING), "grafana": {"prometheus"},
    }
    for name, deps in expected_deps.items():
        got = svcs[name]["depends_on"]
        assert set(got) == deps, name
        assert all(d["condition"] == "service_healthy" for d in got.values()), name


def test_redis_is_ephemeral() -> None:
    redis = services()["redis"]
    assert redis["image"] == "redis:7-alpine"
    cmd = redis["command"]
    assert cmd[cmd.index("--save") + 1] == "" and cmd[cmd.index("--appendonly") + 1] == "no"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis  # the backplane is not published on the host


def test_signaling_instances() -> None:
    svcs = services()
    dockerfile_env = env_of(parse_dockerfile((ROOT / "Dockerfile").read_text())[1][-1])
    for name in SIGNALING:
        svc = svcs[name]
        assert svc["build"] == "." and (ROOT / "Dockerfile").is_file()
        assert svc["image"] == "liberty-reach/signaling:latest"
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert "DEV-ONLY" in env["JWT_SECRET"], "the compose JWT_SECRET must look like one"
        settings = Settings.from_env(env)  # the server accepts this configuration
        assert settings.redis_url == env["REDIS_URL"]
        metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]
        assert metrics_dir == dockerfile_env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
        assert metrics_dir in svc["tmpfs"]
        test = " ".join(svc["healthcheck"]["test"])
        assert "urllib" in test and "http://127.0.0.1:8080/health" in test
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace > float(env["GRACEFUL_SHUTDOWN_TIMEOUT"])
        assert "ports" not in svc  # reached through the load balancer
    # the dev secret is labelled as such right where it is set
    text = COMPOSE.read_text()
    secret_line = next(i for i, ln in enumerate(text.splitlines()) if "JWT_SECRET:" in ln)
    assert "DEV ONLY" in "\n".join(text.splitlines()[secret_line - 4:secret_line])


def test_published_ports_are_loopback_only() -> None:
    published = {name: svc["ports"] for name, svc in services().items() if "ports" in svc}
    assert set(published) == {"lb", "prometheus", "grafana"}
    for name, ports in published.items():
        for p in ports:
            assert str(p).startswith("127.0.0.1:"), (name, p)


def test_mounted_files_exist() -> None:
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"
    prometheus_mounts = [v for v in services()["prometheus"]["volumes"] if v.startswith("./")]
    config = yaml.safe_load((ROOT / "config/prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert any(v.endswith(f"/etc/prometheus/{rule_file}:ro") for v in prometheus_mounts)


# ------------------------------------------------------------------------ nginx


def nginx_conf() -> str:
    return "\n".join(ln.split("#", 1)[0] for ln in NGINX.read_text().splitlines())


def test_nginx_balances_both_instances_without_stickiness() -> None:
    conf = nginx_conf()
    lb = services()["lb"]
    assert "./config/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    upstream = re.search(r"upstream signaling \{(.*?)\}", conf, re.S)
    assert upstream
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(1), re.M)
    assert sorted(servers) == [(name, "8080") for name in SIGNALING]
    for sticky in ("ip_hash", "sticky", "hash "):
        assert sticky not in upstream.group(1), sticky
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", conf, re.M)
    assert lb["ports"] == [f"127.0.0.1:{listen}:{listen}"]
    health = re.search(r"location = (/\S+) \{\s*default_type text/plain;\s*return 200", conf)
    assert health and health.group(1) in " ".join(lb["healthcheck"]["test"])


def test_nginx_passes_websocket_upgrades() -> None:
    conf = nginx_conf()
    location = re.search(r"location / \{(.*?)\}", conf, re.S)
    assert location
    body = location.group(1)
    assert "proxy_pass http://signaling;" in body
    assert "proxy_http_version 1.1;" in body
    assert "proxy_set_header Upgrade $http_upgrade;" in body
    assert "proxy_set_header Connection $connection_upgrade;" in body
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{\s*default upgrade;", conf)
    (timeout,) = re.findall(r"proxy_read_timeout (\d+)s;", body)
    assert int(timeout) >= 3600


def test_nginx_never_logs_client_addresses() -> None:
    conf = nginx_conf()
    assert re.search(r"^\s*access_log off;", conf, re.M)
    assert not re.search(r"access_log\s+(?!off)", conf), "an access log is configured"
    assert "log_format" not in conf
    (level,) = re.findall(r"^\s*error_log\s+\S+\s+(\w+);", conf, re.M)
    assert level in ("alert", "emerg"), "error lines from crit down carry the client address"
    for leak in ("$remote_addr", "$proxy_add_x_forwarded_for", "X-Forwarded-For",
                 "X-Real-IP", "$request_uri", "$args", "$query_string"):
        assert leak not in conf, leak
