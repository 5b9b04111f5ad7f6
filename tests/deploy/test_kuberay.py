"""The coordinator's KubeRay RayCluster: known ray.io/v1 fields only, valid pod templates, and
container commands that really start Ray and then the coordinator (run here with stand-ins)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from specd.core import defaults as specd_config
from tests.deploy.conftest import DEPLOY, RELEASE, Manifest, find, render_objects
from tests.deploy.kuberay import pod_templates, raycluster_errors
from tests.deploy.test_chart import FULL_VALUES, kube_versions

RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


@pytest.fixture(scope="module")
def cluster(default_objects: list[Manifest]) -> Manifest:
    return find(default_objects, "RayCluster", f"{RELEASE}-specd")


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "all-options"])
def test_raycluster_uses_only_known_v1_fields(values: dict[str, Any] | None) -> None:
    (obj,) = [o for o in render_objects(values) if o["kind"] == "RayCluster"]
    assert raycluster_errors(obj) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda spec: spec["headGroupSpec"].update(rayStartParam={}), "'rayStartParam' was unexpected"),
        (lambda spec: spec["headGroupSpec"].pop("template"), "'template' is a required property"),
        (lambda spec: spec["workerGroupSpecs"][0].pop("maxReplicas"), "'maxReplicas' is a required property"),
        (lambda spec: spec["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": 4}), "4 is not of type 'string'"),
        (lambda spec: spec.update(enableInTreeAutoScaling=True), "'enableInTreeAutoScaling' was unexpected"),
        (lambda spec: spec["workerGroupSpecs"][0].update(replicas=9), "minReplicas <= replicas <= maxReplicas"),
        (lambda spec: spec["workerGroupSpecs"].append(copy.deepcopy(spec["workerGroupSpecs"][0])), "duplicate groupName"),
    ],
)
def test_field_check_catches_mistakes(cluster: Manifest, mutate: Any, expected: str) -> None:
    """The whitelist is not vacuous: typical slips are reported."""
    broken = copy.deepcopy(cluster)
    mutate(broken["spec"])
    assert any(expected in error for error in raycluster_errors(broken)), raycluster_errors(broken)


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "all-options"])
@pytest.mark.parametrize("version", kube_versions())
def test_ray_pod_templates_pass_strict_kubernetes_validation(values: dict[str, Any] | None, version: str) -> None:
    (obj,) = [o for o in render_objects(values) if o["kind"] == "RayCluster"]
    for group, template in pod_templates(obj).items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        kubernetes_validate.validate(wrapper, version, strict=True)


def test_head_runs_the_coordinator_with_its_ports_and_probes(cluster: Manifest) -> None:
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {
        **RAY_PORTS,
        "grpc": specd_config.COORDINATOR_PORT,
        "specd-metrics": specd_config.COORDINATOR_METRICS_PORT,
        "http": specd_config.COORDINATOR_HTTP_PORT,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert head[probe]["grpc"] == {"port": specd_config.COORDINATOR_PORT, "service": ""}


def test_ray_version_matches_the_coordinator_image(cluster: Manifest) -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile.coordinator").read_text()
    bases = set(re.findall(r"^FROM\s+rayproject/ray:(\S+)", dockerfile, flags=re.MULTILINE))
    assert len(bases) == 1
    (tag,) = bases
    assert tag.split("-")[0] == cluster["spec"]["rayVersion"]
    image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f"ray{cluster['spec']['rayVersion']}")


def stub(bin_dir: Path, name: str, log: Path, exit_code: int = 0) -> None:
    """A stand-in command that appends its name and arguments to log."""
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit {exit_code}\n')
    path.chmod(0o755)


def run_container_command(command: list[str], env: dict[str, str], tmp_path: Path, stubs: dict[str, int]) -> list[str]:
    """Run a container's shell command with stand-ins for ray/specd/specctl/sleep; return their calls."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, exit_code in stubs.items():
        stub(bin_dir, name, log, exit_code)
    shell, *flags = command[:-1]
    # `bash -l` would read the host's profile; the command itself is what is under test.
    flags = ["-c" if flag == "-lc" else flag for flag in flags]
    result = subprocess.run(
        [Path(shell).name, *flags, command[-1]],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def test_head_command_starts_ray_then_execs_the_coordinator(cluster: Manifest, tmp_path: Path) -> None:
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    generated = "ray start --head --dashboard-host=0.0.0.0 --block --metrics-export-port=8080"
    calls = run_container_command(
        head["command"] + head["args"], {"KUBERAY_GEN_RAY_START_CMD": generated}, tmp_path, {"ray": 0, "specd": 0}
    )
    # Ray must not block, or the coordinator would never start.
    assert calls == ["ray start --head --dashboard-host=0.0.0.0 --metrics-export-port=8080", "specd serve coordinator"]


def test_head_command_stops_when_ray_fails_to_start(cluster: Manifest, tmp_path: Path) -> None:
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stub(bin_dir, "ray", log, exit_code=1)
    stub(bin_dir, "specd", log)
    result = subprocess.run(
        ["bash", "-c", head["args"][0]],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "KUBERAY_GEN_RAY_START_CMD": "ray start --head --block"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert log.read_text().splitlines() == ["ray start --head"]


def test_worker_group_command_runs_the_generated_ray_start(cluster: Manifest, tmp_path: Path) -> None:
    (group,) = cluster["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    generated = "ray start --address=demo-specd-head-svc:6379 --block"
    calls = run_container_command(
        worker["command"] + worker["args"], {"KUBERAY_GEN_RAY_START_CMD": generated}, tmp_path, {"ray": 0}
    )
    assert calls == [generated]
