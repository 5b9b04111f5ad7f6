"""The Helm chart, rendered offline: core objects validate against the Kubernetes API schema,
the workers are wired to the services' real settings and ports, and upgrades cannot cut
in-flight sessions short."""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from coordinator.config import CoordinatorConfig
from draft_service.config import DraftConfig
from oracle_service.config import OracleConfig
from specd.cli.main import build_parser
from specd.core import defaults as specd_config
from tests.deploy.conftest import CHART, NAMESPACE, RELEASE, Manifest, find, render_chart, render_objects

CORE_KINDS = {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount", "NetworkPolicy"}
PREFIX = f"{RELEASE}-specd"
WORKERS = {
    "oracle": (OracleConfig, specd_config.ORACLE_PORT, specd_config.ORACLE_METRICS_PORT),
    "draft": (DraftConfig, specd_config.DRAFT_PORT, specd_config.DRAFT_METRICS_PORT),
}
# Every option switched on: secrets, a shared cache claim, minAvailable, a load balancer.
FULL_VALUES: dict[str, Any] = {
    "imagePullSecrets": ["registry-creds"],
    "secrets": {
        "huggingFace": {"existingSecret": "hf-token", "key": "token"},
        "auth": {
            "enabled": True,
            "client": {"existingSecret": "team-tokens", "key": "tokens"},
            "admin": {"existingSecret": "ops-token", "key": "token"},
            "worker": {"existingSecret": "mesh-token", "key": "token"},
        },
        "tls": {"existingSecret": "specd-tls"},
    },
    "oracle": {
        "replicas": 3,
        "cache": {"existingClaim": "model-cache"},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
        "extraEnv": [{"name": "CUDA_MODULE_LOADING", "value": "LAZY"}],
    },
    "draft": {"drain": {"enabled": False, "timeoutSeconds": 1, "endpointDelaySeconds": 3}},
    "coordinator": {"service": {"type": "LoadBalancer", "annotations": {"example.com/internal": "true"}}},
    "ray": {"enableInTreeAutoscaling": True},
}


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schema known."""
    declared = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    oldest = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", declared)
    assert oldest, f"unexpected kubeVersion constraint {declared!r}"
    return [oldest.group(1), kubernetes_validate.utils.latest_version()]


def deployment(objects: list[Manifest], role: str) -> Manifest:
    return find(objects, "Deployment", f"{PREFIX}-{role}")


def container(workload: Manifest, name: str) -> dict[str, Any]:
    (match,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return match


def config_data(objects: list[Manifest]) -> dict[str, str]:
    return find(objects, "ConfigMap", f"{PREFIX}-config")["data"]


def literal_env(container_spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}


def clear_specd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPECD_"):
            monkeypatch.delenv(key)


def test_default_render_has_every_component(default_objects: list[Manifest]) -> None:
    kinds = Counter(o["kind"] for o in default_objects)
    assert kinds == Counter(
        {"Deployment": 2, "Service": 3, "PodDisruptionBudget": 2, "ConfigMap": 2, "ServiceAccount": 1, "RayCluster": 1,
         "NetworkPolicy": 1}
    )
    for role in WORKERS:
        for kind in ("Deployment", "Service", "PodDisruptionBudget"):
            find(default_objects, kind, f"{PREFIX}-{role}")
    find(default_objects, "Service", f"{PREFIX}-coordinator")
    find(default_objects, "RayCluster", PREFIX)


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "all-options"])
@pytest.mark.parametrize("version", kube_versions())
def test_core_objects_pass_strict_kubernetes_validation(values: dict[str, Any] | None, version: str) -> None:
    objects = render_objects(values)
    assert {o["kind"] for o in objects} <= CORE_KINDS | {"RayCluster"}
    for obj in objects:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("role", WORKERS)
def test_worker_serves_grpc_health_on_the_configured_ports(default_objects: list[Manifest], role: str) -> None:
    _, port, metrics_port = WORKERS[role]
    spec = container(deployment(default_objects, role), role)
    assert spec["command"] == ["specd", "serve", role]
    assert build_parser().parse_args(spec["command"][1:]).role == role
    assert {p["name"]: p["containerPort"] for p in spec["ports"]} == {"grpc": port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"] == {"port": port, "service": ""}, probe


def test_oracle_and_draft_are_scheduled_on_separate_pools(default_objects: list[Manifest]) -> None:
    oracle = deployment(default_objects, "oracle")["spec"]["template"]["spec"]
    draft = deployment(default_objects, "draft")["spec"]["template"]["spec"]
    assert oracle["nodeSelector"] and draft["nodeSelector"]
    assert oracle["nodeSelector"] != draft["nodeSelector"]
    for pod in (oracle, draft):
        assert pod["tolerations"], "GPU pools are usually tainted"
        assert pod["affinity"]
        resources = pod["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert oracle["containers"][0]["resources"] != draft["containers"][0]["resources"]


@pytest.mark.parametrize("role", WORKERS)
def test_worker_settings_parse_as_the_service_config(
    default_objects: list[Manifest], role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the pod's environment holds is what the worker's pydantic settings accept."""
    config_class, port, metrics_port = WORKERS[role]
    prefix = config_class.model_config["env_prefix"]
    env = {**config_data(default_objects), **literal_env(container(deployment(default_objects, role), role))}

    ours = {key.removeprefix(prefix).lower() for key in env if key.startswith(prefix)}
    # Unknown SPECD_* variables are ignored by pydantic-settings: a typo would go unnoticed.
    assert ours <= set(config_class.model_fields), ours - set(config_class.model_fields)

    clear_specd_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = config_class()
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", port, metrics_port)
    values = yaml.safe_load((CHART / "values.yaml").read_text())[role]
    assert settings.model == values["model"]
    assert settings.layers == values["layers"]
    assert settings.device == values["device"]
    assert settings.grace_seconds == values["graceSeconds"]
    assert settings.cache_dir == "/var/cache/specd"


def test_coordinator_settings_parse_and_name_the_worker_services(
    default_objects: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    head = find(default_objects, "RayCluster", PREFIX)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {**config_data(default_objects), **literal_env(head)}
    prefix = CoordinatorConfig.model_config["env_prefix"]
    ours = {k.removeprefix(prefix).lower() for k in env if k.startswith(prefix)}
    assert ours <= set(CoordinatorConfig.model_fields), ours - set(CoordinatorConfig.model_fields)

    clear_specd_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = CoordinatorConfig()
    assert (settings.host, settings.port) == ("0.0.0.0", specd_config.COORDINATOR_PORT)
    assert settings.metrics_port == specd_config.COORDINATOR_METRICS_PORT
    assert settings.http_port == specd_config.COORDINATOR_HTTP_PORT
    assert settings.ray_address == "auto"
    values = yaml.safe_load((CHART / "values.yaml").read_text())["coordinator"]
    assert (settings.depth_policy, settings.max_depth) == (values["depthPolicy"], values["maxDepth"])

    # The chart's workers register themselves; no static list to keep in step with replicas.
    assert (settings.drafts, settings.oracles) == ([], [])


@pytest.mark.parametrize("role", WORKERS)
def test_workers_register_themselves_with_the_coordinator_service(default_objects: list[Manifest], role: str) -> None:
    pod = deployment(default_objects, role)["spec"]["template"]["spec"]
    sidecar = container(deployment(default_objects, role), "register")
    assert sidecar["command"] == ["/bin/sh", "/etc/specd/scripts/register.sh"]
    assert sidecar["image"] == container(deployment(default_objects, role), role)["image"]
    env = literal_env(sidecar)
    assert env["WORKER_ROLE"] == role
    assert env["WORKER_ADDRESS"] == f"$(POD_IP):{WORKERS[role][1]}"
    names = [e["name"] for e in sidecar["env"]]
    assert names.index("POD_IP") < names.index("WORKER_ADDRESS"), "$(POD_IP) expands only from earlier entries"
    # specctl's coordinator address is the coordinator Service, on its gRPC port.
    host, port = env["SPECD_ADDRESS"].rsplit(":", 1)
    service_name, namespace, *_ = host.split(".")
    assert namespace == NAMESPACE
    service = find(default_objects, "Service", service_name)
    assert selected(service["spec"]["selector"], default_objects)[0]["spec"]["containers"][0]["name"] == "ray-head"
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}
    scripts = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert {"register.sh", "drain.sh"} <= set(find(default_objects, "ConfigMap", scripts.pop())["data"])


def test_static_worker_lists_replace_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    drafts, oracles = ["10.0.3.4:50052", "draft-b.example:50052"], ["oracle-a.example:50051"]
    objects = render_objects({"registration": {"enabled": False}, "coordinator": {"drafts": drafts, "oracles": oracles}})
    for role in WORKERS:
        assert [c["name"] for c in deployment(objects, role)["spec"]["template"]["spec"]["containers"]] == [role]
    data = config_data(objects)
    clear_specd_env(monkeypatch)
    for key in ("SPECD_COORDINATOR_DRAFTS", "SPECD_COORDINATOR_ORACLES"):
        monkeypatch.setenv(key, data[key])
    settings = CoordinatorConfig()
    assert (settings.drafts, settings.oracles) == (drafts, oracles)


def pod_templates(objects: list[Manifest]) -> list[dict[str, Any]]:
    templates = [o["spec"]["template"] for o in objects if o["kind"] == "Deployment"]
    for cluster in (o for o in objects if o["kind"] == "RayCluster"):
        templates.append(cluster["spec"]["headGroupSpec"]["template"])
        templates.extend(group["template"] for group in cluster["spec"].get("workerGroupSpecs", []))
    return templates


def selected(selector: dict[str, str], objects: list[Manifest]) -> list[dict[str, Any]]:
    return [t for t in pod_templates(objects) if selector.items() <= t["metadata"]["labels"].items()]


def test_every_service_reaches_exactly_one_workload_by_named_port(default_objects: list[Manifest]) -> None:
    for service in (o for o in default_objects if o["kind"] == "Service"):
        targets = selected(service["spec"]["selector"], default_objects)
        assert len(targets) == 1, service["metadata"]["name"]
        port_names = {p["name"] for c in targets[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)
    for role in WORKERS:
        # Sessions live in one replica: the coordinator needs every pod's own address.
        assert find(default_objects, "Service", f"{PREFIX}-{role}")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("role", WORKERS)
def test_disruption_budget_covers_exactly_its_workers(default_objects: list[Manifest], role: str) -> None:
    budget = find(default_objects, "PodDisruptionBudget", f"{PREFIX}-{role}")
    assert budget["spec"]["selector"] == deployment(default_objects, role)["spec"]["selector"]
    assert selected(budget["spec"]["selector"]["matchLabels"], default_objects) == [
        deployment(default_objects, role)["spec"]["template"]
    ]


@pytest.mark.parametrize("role", WORKERS)
def test_pods_outlive_drain_and_grace(default_objects: list[Manifest], role: str) -> None:
    """SIGKILL must never arrive before drain, endpoint removal and the worker's grace period end."""
    pod = deployment(default_objects, role)["spec"]["template"]["spec"]
    worker = container(deployment(default_objects, role), role)
    assert worker["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", "/etc/specd/scripts/drain.sh"]
    env = literal_env(worker)
    drain_timeout, endpoint_delay = int(env["DRAIN_TIMEOUT_SECONDS"]), int(env["ENDPOINT_DELAY_SECONDS"])
    grace = float(config_data(default_objects)[f"SPECD_{role.upper()}_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain_timeout + endpoint_delay + grace
    strategy = deployment(default_objects, role)["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rollout must not remove capacity before the new pod is ready"


def test_coordinator_outlives_its_grace(default_objects: list[Manifest]) -> None:
    head = find(default_objects, "RayCluster", PREFIX)["spec"]["headGroupSpec"]["template"]["spec"]
    grace = float(config_data(default_objects)["SPECD_COORDINATOR_GRACE_SECONDS"])
    delay = int(re.search(r"sleep (\d+)", head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]).group(1))
    assert head["terminationGracePeriodSeconds"] > grace + delay


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"oracle": {"terminationGracePeriodSeconds": 100}}, "oracle.terminationGracePeriodSeconds (100) must exceed"),
        ({"draft": {"graceSeconds": 200}}, "draft.terminationGracePeriodSeconds (180) must exceed"),
        ({"coordinator": {"maxDepth": 32}}, "coordinator.maxDepth (32) exceeds oracle.maxDepth (16)"),
        ({"draft": {"maxDepth": 4}}, "coordinator.maxDepth (8) exceeds draft.maxDepth (4)"),
        ({"coordinator": {"depthPolicy": "fixed:9"}}, "depthPolicy fixed:9 exceeds coordinator.maxDepth (8)"),
        ({"coordinator": {"graceSeconds": 60}}, "coordinator.terminationGracePeriodSeconds (60) must exceed"),
        ({"registration": {"enabled": False}}, "needs coordinator.drafts and coordinator.oracles"),
    ],
)
def test_render_refuses_settings_that_drop_requests(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_chart(values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"oracle": {"dtype": "fp8"}}, "/oracle/dtype"),
        ({"draft": {"device": "gpu"}}, "/draft/device"),
        ({"image": {"worker": {"tag": "latest"}}}, "/image/worker/tag"),
        ({"coordinator": {"depthPolicy": "adaptive"}}, "/coordinator/depthPolicy"),
        ({"coordinator": {"drafts": ["no-port.example"]}}, "/coordinator/drafts/0"),
        ({"secrets": {"auth": {"admin": {"existingSecret": "Not_A_Name", "key": "token"}}}}, "/secrets/auth/admin"),
        ({"ray": {"head": {"rayStartParams": {"num-cpus": 0}}}}, "/ray/head/rayStartParams/num-cpus"),
        ({"oracel": {"replicas": 2}}, "additional properties 'oracel'"),
    ],
)
def test_schema_rejects_invalid_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render_chart(values)


def secret_references(objects: list[Manifest]) -> set[str]:
    names: set[str] = set()
    for template in pod_templates(objects):
        spec = template["spec"]
        names |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        names |= {s["name"] for s in spec.get("imagePullSecrets", [])}
        for c in spec["containers"]:
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    return names


def test_secrets_are_referenced_by_name_never_inlined(default_objects: list[Manifest]) -> None:
    # Auth is on by default: the three role credentials, from Secrets the operator creates.
    assert secret_references(default_objects) == {"specd-client-tokens", "specd-admin-token", "specd-worker-token"}
    assert secret_references(render_objects({"secrets": {"auth": {"enabled": False}}})) == set()
    objects = render_objects(FULL_VALUES)
    assert "Secret" not in {o["kind"] for o in objects}
    assert secret_references(objects) == {"hf-token", "team-tokens", "ops-token", "mesh-token", "specd-tls", "registry-creds"}
    for template in pod_templates(objects):
        mounts = {m["mountPath"]: m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert mounts["/etc/specd/tls"]["readOnly"] and mounts["/etc/specd/auth/worker"]["readOnly"]
        env = literal_env(template["spec"]["containers"][0])
        assert env["SPECD_WORKER_TOKEN_FILE"] == "/etc/specd/auth/worker/token"
        assert env["SPECD_TLS_CA_FILE"] == "/etc/specd/tls/ca.crt"


def test_each_pod_holds_only_the_credentials_of_its_roles() -> None:
    objects = render_objects(FULL_VALUES)
    head = find(objects, "RayCluster", f"{PREFIX}")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {k for k in literal_env(head) if k.endswith("TOKEN_FILE")} == {
        "SPECD_AUTH_TOKEN_FILE", "SPECD_ADMIN_TOKEN_FILE", "SPECD_WORKER_TOKEN_FILE",
    }
    assert literal_env(head)["SPECD_AUTH_TOKEN_FILE"] == "/etc/specd/auth/client/tokens"
    for role in WORKERS:
        containers = {c["name"]: c for c in deployment(objects, role)["spec"]["template"]["spec"]["containers"]}
        worker, sidecar = containers[role], containers["register"]
        assert {k for k in literal_env(worker) if k.endswith("TOKEN_FILE")} == {"SPECD_WORKER_TOKEN_FILE", "SPECD_ADMIN_TOKEN_FILE"}
        assert {k for k in literal_env(sidecar) if k.endswith("TOKEN_FILE")} == {"SPECD_ADMIN_TOKEN_FILE"}


def test_drafts_and_oracles_scale_separately(default_objects: list[Manifest]) -> None:
    """Scaling or re-modelling the drafts leaves the oracle pods untouched (no rollout), and back."""
    scaled = render_objects({"draft": {"replicas": 6, "model": "HuggingFaceTB/SmolLM2-360M-Instruct"}})
    assert deployment(scaled, "draft")["spec"]["replicas"] == 6
    assert deployment(scaled, "oracle") == deployment(default_objects, "oracle")
    assert deployment(scaled, "draft")["spec"]["template"] != deployment(default_objects, "draft")["spec"]["template"]

    scaled = render_objects({"oracle": {"replicas": 4}})
    assert deployment(scaled, "oracle")["spec"]["replicas"] == 4
    assert deployment(scaled, "draft") == deployment(default_objects, "draft")


def test_helm_lint_reports_no_warnings() -> None:
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_ray_s_own_ports_answer_only_the_release_s_pods(default_objects: list[Manifest]) -> None:
    policy = find(default_objects, "NetworkPolicy", f"{PREFIX}-ray-head")["spec"]
    ray_rule, open_rule = policy["ingress"]
    assert {p["port"] for p in ray_rule["ports"]} == {6379, 8265, 10001}
    assert ray_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert {p["port"] for p in open_rule["ports"]} == {
        specd_config.COORDINATOR_PORT, specd_config.COORDINATOR_METRICS_PORT, specd_config.COORDINATOR_HTTP_PORT,
    }
    assert "NetworkPolicy" not in {o["kind"] for o in render_objects({"ray": {"head": {"restrictRayPorts": False}}})}
