"""Fixtures for the deployment checks: the chart rendered offline, and the pinned buf binary.

Nothing here needs a cluster, a Docker engine or the helm CLI: helm-python-sdk renders the
chart in-process, and buf comes from deploy/tools (npm ci on first use).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "specd"
TOOLS = DEPLOY / "tools"
RELEASE = "demo"
NAMESPACE = "specd"

Manifest = dict[str, Any]


def render_chart(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, exactly as `helm template demo -n specd` would produce."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def parse_manifests(rendered: dict[str, str]) -> list[Manifest]:
    objects = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render_objects(values: dict[str, Any] | None = None) -> list[Manifest]:
    return parse_manifests(render_chart(values))


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="session")
def default_rendered() -> dict[str, str]:
    return render_chart()


@pytest.fixture(scope="session")
def default_objects(default_rendered: dict[str, str]) -> list[Manifest]:
    return parse_manifests(default_rendered)


@pytest.fixture(scope="session")
def buf() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the buf pinned in deploy/tools/package-lock.json, installing it with `npm ci` if needed.

    A missing npm is a failure, not a skip: the proto checks are part of the contract.
    """
    binary = TOOLS / "node_modules" / ".bin" / "buf"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is required to install buf: run `npm ci --prefix deploy/tools` on a machine with Node.js")
        result = subprocess.run(
            [npm, "ci", "--prefix", str(TOOLS), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0 or not binary.exists():
            pytest.fail(f"`npm ci --prefix deploy/tools` failed:\n{result.stdout}\n{result.stderr}")

    def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True, timeout=120)

    return run
