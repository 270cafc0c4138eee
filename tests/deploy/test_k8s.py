"""``kubectl apply -k k8s`` and its overlays, without a cluster: each renders with kustomize
(kubectl's built-in one), every object validates offline against the Kubernetes JSON
schemas (kubernetes-validate, strict: unknown fields are errors), and the properties the
deployment promises hold in the rendered output.

ServiceMonitor (monitoring.coreos.com/v1) is a CRD that kubernetes-validate has no schema
for: it is skipped by kind there and checked structurally below instead."""

from __future__ import annotations

import base64
import copy
import subprocess
from functools import cache
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.deploy.tools import ROOT, kustomize_command

pytestmark = pytest.mark.deploy

TARGETS = ["k8s", "k8s/overlays/servicemonitor", "k8s/overlays/external-redis"]
NAMESPACE = "liberty-reach"
# oldest Kubernetes minor still commonly run, and the newest the package has schemas for
K8S_VERSIONS = ("1.30", "latest")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

Obj = dict[str, Any]


@cache
def render(target: str) -> tuple[Obj, ...]:
    cmd = kustomize_command() + [str(ROOT / target)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def generated(objs: tuple[Obj, ...], kind: str, prefix: str) -> Obj:
    """A ConfigMap/Secret from a generator: its name carries a content hash."""
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"{kind} {prefix}*: {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objs: tuple[Obj, ...]) -> Obj:
    (c,) = one(objs, "Deployment", "signaling")["spec"]["template"]["spec"]["containers"]
    return dict(c)


def settings_env(objs: tuple[Obj, ...]) -> dict[str, str]:
    env = dict(generated(objs, "ConfigMap", "signaling-config-")["data"])
    for k, v in generated(objs, "Secret", "signaling-jwt-")["data"].items():
        env[k] = base64.b64decode(v).decode()
    return env


def k8s_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return [latest_version() if v == "latest" else v for v in K8S_VERSIONS]


# ----------------------------------------------------------------------- render/validate


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_against_kubernetes_schemas(target: str) -> None:
    import kubernetes_validate

    objs = render(target)
    assert len(objs) >= 8
    problems, skipped = [], []
    for obj in objs:
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            skipped.append(label)
            continue
        for version in k8s_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{label} (k8s {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{label}: {exc.message}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, label
    assert not problems, "\n".join(problems)
    assert skipped == (["ServiceMonitor/signaling"] if "servicemonitor" in target else [])


def test_validation_is_strict() -> None:
    """The validator does reject a typo and a wrong type (so a pass above means something)."""
    import kubernetes_validate

    deployment = one(render("k8s"), "Deployment", "signaling")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "three"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, k8s_versions()[0], strict=True)


# ----------------------------------------------------------------------- the base


def test_base_has_every_piece() -> None:
    objs = render("k8s")
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs
                   if o["kind"] not in ("ConfigMap", "Secret"))
    assert kinds == sorted([
        ("Namespace", NAMESPACE), ("Deployment", "signaling"), ("Service", "signaling"),
        ("HorizontalPodAutoscaler", "signaling"), ("PodDisruptionBudget", "signaling"),
        ("StatefulSet", "redis"), ("Service", "redis"), ("NetworkPolicy", "redis"),
    ])
    generated(objs, "ConfigMap", "signaling-config-")
    generated(objs, "Secret", "signaling-jwt-")
    assert one(objs, "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"
    assert one(objs, "PodDisruptionBudget")["apiVersion"] == "policy/v1"


def test_deployment_replicas_probes_and_graceful_stop() -> None:
    objs = render("k8s")
    dep = one(objs, "Deployment", "signaling")
    pod = dep["spec"]["template"]["spec"]
    c = container(objs)
    env = settings_env(objs)
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", 8080)
    assert c["args"] == ["-addr", ":8080"]
    assert c["image"] == "liberty-reach/signaling:latest"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8080), probe
    # preStop sleep, then the server's drain within GRACEFUL_SHUTDOWN_TIMEOUT, all within
    # the grace period
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain, graceful = float(env["DRAIN_SECONDS"]), float(env["GRACEFUL_SHUTDOWN_TIMEOUT"])
    assert (drain, graceful) == (5, 15)
    assert drain < graceful
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + graceful, (grace, pre_stop, graceful)
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}, kind


def test_deployment_security_context_and_volumes() -> None:
    objs = render("k8s")
    pod = one(objs, "Deployment", "signaling")["spec"]["template"]["spec"]
    c = container(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]]
              for m in c["volumeMounts"]}
    env = settings_env(objs)
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/metrics"
    for path in ("/tmp", "/tmp/metrics"):
        assert "emptyDir" in mounts[path], path
    assert mounts["/tmp/metrics"]["emptyDir"]["medium"] == "Memory"


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    objs = render("k8s")
    ns = one(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for kind, name in (("Deployment", "signaling"), ("StatefulSet", "redis")):
        pod = one(objs, kind, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        for v in pod.get("volumes", []):
            assert set(v) - {"name"} <= {"emptyDir", "configMap", "secret", "projected"}, v
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["readOnlyRootFilesystem"] is True, name


def test_deployment_env_and_scrape_annotations() -> None:
    objs = render("k8s")
    dep = one(objs, "Deployment", "signaling")
    c = container(objs)
    refs = {next(iter(e)): e[next(iter(e))]["name"] for e in c["envFrom"]}
    assert refs["configMapRef"] == generated(objs, "ConfigMap", "signaling-config-")[
        "metadata"]["name"]
    assert refs["secretRef"] == generated(objs, "Secret", "signaling-jwt-")["metadata"]["name"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080",
                   "prometheus.io/path": "/metrics"}


def test_settings_are_accepted_by_the_server() -> None:
    """The ConfigMap plus the Secret is a configuration the server starts with."""
    objs = render("k8s")
    env = settings_env(objs)
    settings = Settings.from_env(env)
    assert settings.redis_url == "redis://redis:6379/0"
    redis_svc = one(objs, "Service", "redis")
    assert [p["port"] for p in redis_svc["spec"]["ports"]] == [6379]
    assert int(env["WORKERS"]) == 1


def test_service_has_no_session_affinity() -> None:
    objs = render("k8s")
    svc = one(objs, "Service", "signaling")
    pod_labels = one(objs, "Deployment", "signaling")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"].get("sessionAffinity", "None") == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == 8080


def test_hpa_and_pdb_target_the_deployment() -> None:
    objs = render("k8s")
    dep = one(objs, "Deployment", "signaling")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    hpa = one(objs, "HorizontalPodAutoscaler", "signaling")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "signaling"}
    assert hpa["minReplicas"] == dep["spec"]["replicas"] < hpa["maxReplicas"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one(objs, "PodDisruptionBudget", "signaling")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["maxUnavailable"] == 1


def test_redis_statefulset_is_self_contained() -> None:
    objs = render("k8s")
    sts = one(objs, "StatefulSet", "redis")
    svc = one(objs, "Service", "redis")
    assert sts["spec"]["serviceName"] == "redis"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"][
        "labels"].items()
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "redis:7-alpine"
    args = c["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    policy = one(objs, "NetworkPolicy", "redis")["spec"]
    sources = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert sources.items() <= one(objs, "Deployment", "signaling")["spec"]["template"][
        "metadata"]["labels"].items()


def test_jwt_secret_is_a_marked_dev_placeholder() -> None:
    secret = settings_env(render("k8s"))["JWT_SECRET"]
    assert "DEV-ONLY" in secret and "REPLACE" in secret
    assert len(secret.encode()) >= 32  # the server accepts it, so it must be obvious
    example = (ROOT / "k8s/base/secrets/jwt-secret.env.example").read_text()
    assert "token_urlsafe" in example and "k8s/base/secrets/jwt-secret.env" in example
    kustomization = (ROOT / "k8s/base/kustomization.yaml").read_text()
    assert "DEV ONLY" in kustomization and "secrets/jwt-secret.env" in kustomization


# ----------------------------------------------------------------------- overlays


def _without(objs: tuple[Obj, ...], *kinds: str) -> list[Obj]:
    return [o for o in objs if o["kind"] not in kinds]


def test_servicemonitor_overlay() -> None:
    base, objs = render("k8s"), render("k8s/overlays/servicemonitor")
    mon = one(objs, "ServiceMonitor", "signaling")
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    svc = one(objs, "Service", "signaling")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in mon["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"
    # no double scraping by annotation; the rest is the base, unchanged
    dep = one(objs, "Deployment", "signaling")
    assert not dep["spec"]["template"]["metadata"].get("annotations")
    base_dep = copy.deepcopy(one(base, "Deployment", "signaling"))
    base_dep["spec"]["template"]["metadata"]["annotations"] = {}
    assert dep == base_dep
    assert _without(objs, "ServiceMonitor", "Deployment") == _without(base, "Deployment")


def test_external_redis_overlay() -> None:
    base, objs = render("k8s"), render("k8s/overlays/external-redis")
    assert not [o for o in objs if o["metadata"]["name"] == "redis"]
    assert {o["kind"] for o in objs} == {o["kind"] for o in base} - {"StatefulSet",
                                                                     "NetworkPolicy"}
    c = container(objs)
    (redis_env,) = [e for e in c["env"] if e["name"] == "REDIS_URL"]
    ref = redis_env["valueFrom"]["secretKeyRef"]
    secret = generated(objs, "Secret", "signaling-redis-")
    assert ref == {"name": secret["metadata"]["name"], "key": "REDIS_URL"}
    url = base64.b64decode(secret["data"]["REDIS_URL"]).decode()
    assert "CHANGE-ME" in url
    env = settings_env(objs) | {"REDIS_URL": url}  # env entries win over envFrom
    assert Settings.from_env(env).redis_url == url
    # everything else of the Deployment is the base's
    dep = copy.deepcopy(one(objs, "Deployment", "signaling"))
    del dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert dep == one(base, "Deployment", "signaling")


def test_apply_k_k8s_is_the_base() -> None:
    assert render("k8s") == render("k8s/base")
