"""Prometheus and Grafana, for real: ``promtool`` checks config/prometheus.yml and its rules;
a real ``prometheus`` (Debian's package) runs that configuration against two live
instances; every PromQL expression of the Grafana dashboard names only series the live
/metrics exposes, and evaluates in that Prometheus."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import LiveCluster
from tests.deploy.tools import (
    ROOT,
    Prometheus,
    dashboard_targets,
    exposed_series_names,
    find_tool,
    grafana_to_promql,
    metric_names,
    start_prometheus,
    wait_for,
)

pytestmark = pytest.mark.deploy

PROM_CONFIG = ROOT / "config" / "prometheus.yml"
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "signaling.json"
APT_PROMETHEUS = "apt-get install --no-install-recommends prometheus"
# series Prometheus makes itself for every target, not found in any /metrics
PROMETHEUS_SYNTHETIC = {"up"}


def promtool() -> str:
    return find_tool("promtool", APT_PROMETHEUS)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


# ------------------------------------------------------------------------ static checks


def test_promtool_check_config() -> None:
    out = subprocess.run([promtool(), "check", "config", str(PROM_CONFIG)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    rule_files = [PROM_CONFIG.parent / f for f in config.get("rule_files", [])]
    assert rule_files, "config/prometheus.yml loads no rule file"
    out = subprocess.run([promtool(), "check", "rules", *map(str, rule_files)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_scrapes_every_compose_instance() -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = {t for sc in jobs["signaling"]["static_configs"] for t in sc["targets"]}
    instances = {name for name, svc in compose["services"].items()
                 if svc.get("image", "").startswith("liberty-reach/signaling")}
    assert len(instances) == 2, instances
    assert targets == {f"{name}:8080" for name in instances}
    assert jobs["signaling"].get("metrics_path", "/metrics") == "/metrics"


def test_promql_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (instance, le) '
        '(rate(x_seconds_bucket{job=~"$job", le!="+Inf"}[$__rate_interval])))'
    ) == {"x_seconds_bucket"}
    assert metric_names("sum(rate(a_sum[5m])) / sum(rate(a_count[5m] offset 1h)) > 1e3") == {
        "a_sum", "a_count"}
    assert metric_names('up{job="signaling"} == 0 and on(instance) b') == {"up", "b"}
    assert metric_names("sum(x) by (type) + count without (le) (y)") == {"x", "y"}


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] == "Liberty Reach Signaling"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    exprs = "\n".join(e for _, e in dashboard_targets(dash))
    required = {
        "connections per instance": r"sum by \(instance\) \(signaling_active_connections",
        "messages in by type": r"by \(type\) \(rate\(signaling_messages_received_total",
        "messages out per instance": r"by \(instance\) \(rate\(signaling_messages_sent_total",
        "rate-limit hits": r"by \(instance\) \(rate\(signaling_rate_limit_exceeded_total",
        "delivery p50": r"histogram_quantile\(0\.5, .*signaling_delivery_latency_seconds_bucket",
        "delivery p99": r"histogram_quantile\(0\.99, .*signaling_delivery_latency_seconds_bucket",
        "delivery per instance": r"by \(instance, le\) \(rate\(signaling_delivery_latency",
        "connection duration": r"signaling_connection_duration_seconds_bucket",
        "backplane errors": r"by \(instance, op\) \(rate\(signaling_backplane_errors_total",
    }
    for what, pattern in required.items():
        assert re.search(pattern, exprs), f"no panel for {what}"
    # the path the original README promised is the same dashboard
    assert (ROOT / "monitoring" / "grafana-dashboard.json").resolve() == DASHBOARD.resolve()


def test_grafana_provisioning_matches_compose() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"]
                  if v.startswith("./"))
    prov = ROOT / "config" / "grafana" / "provisioning"
    assert mounts["./config/grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    providers = yaml.safe_load((prov / "dashboards" / "signaling.yml").read_text())["providers"]
    (provider,) = providers
    assert mounts["./config/grafana/dashboards"] == provider["options"]["path"]
    assert (ROOT / "config" / "grafana" / "dashboards" / "signaling.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/signaling.json"


# ------------------------------------------------------------------------ live checks


@pytest.fixture(scope="module")
def prometheus(live_cluster: LiveCluster, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[Prometheus]:
    """config/prometheus.yml with the live instances as targets, a 1 s scrape interval,
    and its alert rules; a real Prometheus on a free port; killed at the end."""
    exe = find_tool("prometheus", APT_PROMETHEUS)
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for rule_file in config.get("rule_files", []):
        (workdir / rule_file).write_text((PROM_CONFIG.parent / rule_file).read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    jobs["signaling"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{s.port}" for s in live_cluster.servers]}]
    config["scrape_configs"] = [jobs["signaling"]]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = start_prometheus(exe, workdir / "prometheus.yml", workdir)
    try:
        yield prom
    finally:
        prom.stop()


def _results(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    data = prom.query(expr)
    assert data["status"] == "success", (expr, data)
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def test_prometheus_scrapes_live_instances(prometheus: Prometheus,
                                           live_cluster: LiveCluster) -> None:
    targets = {f"127.0.0.1:{s.port}" for s in live_cluster.servers}

    def both() -> list[dict[str, Any]] | None:
        """Both instances scraped, each with its one client (alice, bob) — other tests'
        connections through the balancer closed."""
        res = _results(prometheus, "signaling_active_connections")
        got = {r["metric"]["instance"]: float(r["value"][1]) for r in res}
        return res if got == dict.fromkeys(targets, 1.0) else None

    res = wait_for(both, 30)
    assert res, prometheus.log()
    for r in res:
        assert r["metric"]["job"] == "signaling"
        assert r["metric"]["__name__"] == "signaling_active_connections"
    up = _results(prometheus, 'up{job="signaling"}')
    assert {r["metric"]["instance"]: r["value"][1] for r in up} == dict.fromkeys(targets, "1")
    # the same through the per-instance expression of the dashboard
    total = _results(prometheus, "sum(signaling_active_connections)")
    assert float(total[0]["value"][1]) == 2.0


def test_alert_rules_evaluate(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2")
                                      and not r["lastEvaluation"].startswith("0001")
                                      for r in rules) else None

    rules = wait_for(evaluated, 15)
    assert rules, prometheus.api("rules")
    for r in rules:
        assert r["health"] == "ok", r


def test_dashboard_names_only_exposed_metrics(live_cluster: LiveCluster) -> None:
    exposed: set[str] = set()
    for s in live_cluster.servers:
        exposed |= exposed_series_names(live_cluster.metrics(s))
    histograms = {"signaling_delivery_latency_seconds", "signaling_connection_duration_seconds"}
    for h in histograms:  # exposed as _bucket/_sum/_count, never under the bare name
        assert {f"{h}_bucket", f"{h}_sum", f"{h}_count"} <= exposed
        assert h not in exposed
    used: set[str] = set()
    for title, expr in dashboard_targets(dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - exposed - PROMETHEUS_SYNTHETIC
        assert not unknown, f"{title}: {sorted(unknown)} not in /metrics ({expr})"
        used |= names
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*), *(\w+)\)", var["definition"])
            assert inner, var["definition"]
            assert metric_names(inner.group(1)) <= exposed, var["definition"]
    # and the dashboard shows every family the service exports
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed
                if n.startswith("signaling_")}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def test_dashboard_expressions_evaluate(prometheus: Prometheus) -> None:
    """Each expression, with Grafana's variables as "All" sends them, is valid PromQL and
    returns data from the live instances (histogram quantiles may be NaN: no new
    observations in the window)."""
    wait_for(lambda: len(_results(prometheus, "signaling_backplane_errors_total")) > 0, 20)
    wait_for(lambda: _results(prometheus,
                              "count_over_time(signaling_messages_sent_total[10s])")
             and all(float(r["value"][1]) >= 3 for r in _results(
                 prometheus, "count_over_time(signaling_messages_sent_total[10s])")), 20)
    empty = []
    for title, expr in dashboard_targets(dashboard()):
        promql = grafana_to_promql(expr)
        res = _results(prometheus, promql)
        if not res:
            empty.append(f"{title}: {promql}")
            continue
        for r in res:
            value = float(r["value"][1])
            assert value >= 0 or math.isnan(value), (title, r)
    assert not empty, "no data for:\n" + "\n".join(empty)
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            selector, label = re.fullmatch(r"label_values\((.*), *(\w+)\)",
                                           var["definition"]).groups()  # type: ignore[union-attr]
            res = _results(prometheus, grafana_to_promql(selector))
            assert res and all(label in r["metric"] for r in res), var["definition"]

