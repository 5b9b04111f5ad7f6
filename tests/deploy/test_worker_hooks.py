"""The worker pods' shell hooks, run for real with stand-ins for specctl and sleep.

register.sh (sidecar) keeps the pod registered with the coordinator; drain.sh (preStop) drains
it and waits for its sessions. Every specctl call they make must parse with specctl's own
argument parser, and the status JSON they read is produced by specctl's own formatter.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from specd.cli.specctl import build_parser, to_plain
from specd.v1 import admin_pb2
from tests.deploy.conftest import RELEASE, Manifest, find

POD = f"{RELEASE}-specd-oracle-7d9f8-x2x9k"
COORDINATOR = f"{RELEASE}-specd-coordinator.specd.svc.cluster.local:50050"

# One stand-in for both commands: logs its argv, answers from a queue of canned replies.
STAND_IN = """#!{python}
import json, os, signal, sys
from pathlib import Path
state = Path(os.environ["STAND_IN_DIR"])
name = Path(sys.argv[0]).name
with (state / "calls.jsonl").open("a") as log:
    log.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "sleep":
    count = state / "sleeps"
    n = int(count.read_text()) + 1 if count.exists() else 1
    count.write_text(str(n))
    if n == int(os.environ.get("STOP_AFTER_SLEEPS", "0")):
        os.kill(os.getppid(), signal.SIGTERM)
    sys.exit(0)
command = next(a for a in sys.argv[1:] if a in ("drain", "status", "register"))
queue_file = state / f"{{command}}.json"
queue = json.loads(queue_file.read_text())
reply = queue.pop(0) if len(queue) > 1 else queue[0]
queue_file.write_text(json.dumps(queue))
sys.stdout.write(reply.get("stdout", ""))
sys.exit(reply.get("exit", 0))
"""


def status_json(assigned: int) -> str:
    """What `specctl --json status` prints, built by specctl itself."""
    status = admin_pb2.ClusterStatus(
        workers=[
            admin_pb2.WorkerStatus(name=POD, address="10.0.0.7:50051", assigned_sessions=assigned, draining=True),
            admin_pb2.WorkerStatus(name=f"{RELEASE}-specd-oracle-other", assigned_sessions=9),
        ]
    )
    return json.dumps(to_plain(status), indent=2) + "\n"


def run_script(
    default_objects: list[Manifest], script: str, tmp_path: Path, replies: dict[str, list[dict[str, Any]]], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    scripts = find(default_objects, "ConfigMap", f"{RELEASE}-specd-scripts")["data"]
    (tmp_path / script).write_text(scripts[script])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("specctl", "sleep"):
        (bin_dir / name).write_text(STAND_IN.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    for command, queue in replies.items():
        (tmp_path / f"{command}.json").write_text(json.dumps(queue))
    path = f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"
    result = subprocess.run(
        ["sh", str(tmp_path / script)],
        env={"PATH": path, "STAND_IN_DIR": str(tmp_path), "POD_NAME": POD, "SPECD_ADDRESS": COORDINATOR, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for call in calls:
        if call[0] == "specctl":
            build_parser().parse_args(call[1:])  # exits (fails the test) on an unknown command
    return result, calls


def test_drain_waits_for_the_pods_sessions_then_for_endpoint_removal(
    default_objects: list[Manifest], tmp_path: Path
) -> None:
    replies = {"drain": [{"exit": 0}], "status": [{"stdout": status_json(2)}, {"stdout": status_json(1)}, {"stdout": status_json(0)}]}
    env = {"DRAIN_TIMEOUT_SECONDS": "60", "ENDPOINT_DELAY_SECONDS": "5"}
    result, calls = run_script(default_objects, "drain.sh", tmp_path, replies, env)
    assert result.returncode == 0, result.stderr
    assert calls == [
        ["specctl", "drain", POD, "--migrate"],
        ["specctl", "--json", "status"],
        ["sleep", "2"],
        ["specctl", "--json", "status"],
        ["sleep", "2"],
        ["specctl", "--json", "status"],
        ["sleep", "5"],
    ]
    assert f"drained {POD}" in result.stdout


def test_drain_failure_still_waits_for_endpoint_removal(default_objects: list[Manifest], tmp_path: Path) -> None:
    replies = {"drain": [{"exit": 1}], "status": [{"stdout": status_json(3)}]}
    env = {"DRAIN_TIMEOUT_SECONDS": "60", "ENDPOINT_DELAY_SECONDS": "7"}
    result, calls = run_script(default_objects, "drain.sh", tmp_path, replies, env)
    assert result.returncode == 0
    assert calls == [["specctl", "drain", POD, "--migrate"], ["sleep", "7"]]
    assert "grace period" in result.stderr


def test_drain_gives_up_at_its_timeout(default_objects: list[Manifest], tmp_path: Path) -> None:
    """Sessions that never finish cannot hold the pod past DRAIN_TIMEOUT_SECONDS."""
    replies = {"drain": [{"exit": 0}], "status": [{"stdout": status_json(4)}]}
    env = {"DRAIN_TIMEOUT_SECONDS": "1", "ENDPOINT_DELAY_SECONDS": "5"}
    result, calls = run_script(default_objects, "drain.sh", tmp_path, replies, env)
    assert result.returncode == 0
    assert ["specctl", "--json", "status"] in calls
    assert calls[-1] == ["sleep", "5"]


def test_drain_without_migrate_lets_sessions_finish(default_objects: list[Manifest], tmp_path: Path) -> None:
    replies = {"drain": [{"exit": 0}], "status": [{"stdout": status_json(0)}]}
    env = {"DRAIN_TIMEOUT_SECONDS": "60", "ENDPOINT_DELAY_SECONDS": "5", "DRAIN_MIGRATE": "false"}
    result, calls = run_script(default_objects, "drain.sh", tmp_path, replies, env)
    assert result.returncode == 0
    assert calls[0] == ["specctl", "drain", POD]


def test_drain_stops_polling_when_the_coordinator_is_gone(default_objects: list[Manifest], tmp_path: Path) -> None:
    replies = {"drain": [{"exit": 0}], "status": [{"exit": 1}]}
    env = {"DRAIN_TIMEOUT_SECONDS": "60", "ENDPOINT_DELAY_SECONDS": "5"}
    result, calls = run_script(default_objects, "drain.sh", tmp_path, replies, env)
    assert result.returncode == 0
    assert calls == [["specctl", "drain", POD, "--migrate"], ["specctl", "--json", "status"], ["sleep", "5"]]


def test_register_retries_until_the_coordinator_answers_and_stops_on_sigterm(
    default_objects: list[Manifest], tmp_path: Path
) -> None:
    replies = {"register": [{"exit": 1}, {"exit": 0}]}
    env = {
        "WORKER_ROLE": "oracle",
        "WORKER_ADDRESS": "10.0.0.7:50051",
        "REGISTER_INTERVAL_SECONDS": "30",
        "STOP_AFTER_SLEEPS": "3",
    }
    result, calls = run_script(default_objects, "register.sh", tmp_path, replies, env)
    assert result.returncode == 0, result.stderr
    register = ["specctl", "--timeout", "5", "register", "oracle", "10.0.0.7:50051", "--name", POD]
    assert calls == [register, ["sleep", "30"], register, ["sleep", "30"], register, ["sleep", "30"]]
    assert "not reachable" in result.stderr
    assert result.stdout.count("registered ") == 1


@pytest.mark.parametrize("role", ["oracle", "draft"])
def test_hooks_get_the_environment_they_read(default_objects: list[Manifest], role: str) -> None:
    pod = find(default_objects, "Deployment", f"{RELEASE}-specd-{role}")["spec"]["template"]["spec"]
    scripts = find(default_objects, "ConfigMap", f"{RELEASE}-specd-scripts")["data"]
    needs = {
        role: ("drain.sh", {"POD_NAME", "SPECD_ADDRESS", "DRAIN_MIGRATE", "DRAIN_TIMEOUT_SECONDS", "ENDPOINT_DELAY_SECONDS"}),
        "register": ("register.sh", {"POD_NAME", "SPECD_ADDRESS", "WORKER_ROLE", "WORKER_ADDRESS", "REGISTER_INTERVAL_SECONDS"}),
    }
    for container in pod["containers"]:
        script, variables = needs[container["name"]]
        assert variables <= {e["name"] for e in container["env"]}, container["name"]
        # Each variable the script reads is one the container provides (or the script defaults).
        read = set(re.findall(r"\$\{?([A-Z_]+)", scripts[script])) | set(re.findall(r'os\.environ\["([A-Z_]+)"\]', scripts[script]))
        assert read <= variables, read - variables
