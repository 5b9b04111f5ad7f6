"""buf on protos/: the lint rules of protos/buf.yaml, and no breaking change against main.

The breaking check compares the working tree with the main branch of this clone through
buf's git input, so it works in a fresh `git clone` (also a shallow one) without network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import REPO, TOOLS

Buf = Callable[..., subprocess.CompletedProcess[str]]
# Naming we chose on purpose: domain messages (Proposal, Verdict, ModelInfo, ...) as responses,
# and GetInfo/CloseSession/Drain messages shared by the RPCs that mean the same thing.
DELIBERATE_EXCEPTIONS = {"RPC_REQUEST_RESPONSE_UNIQUE", "RPC_REQUEST_STANDARD_NAME", "RPC_RESPONSE_STANDARD_NAME"}


def git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None:
        pytest.fail("git is required for the breaking-change check")
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def against_main(repo: Path) -> str:
    """buf's input for protos/ on main: the local branch in a clone of main, else origin/main."""
    for ref, selector in (("refs/heads/main", "branch=main"), ("refs/remotes/origin/main", "ref=origin/main")):
        if git("rev-parse", "--verify", "--quiet", ref, cwd=repo).returncode == 0:
            return f".git#{selector},subdir=protos"
    pytest.fail(f"{repo} has no main branch to compare against: run `git fetch origin main:main`")


def violations(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_buf_is_the_pinned_version(buf: Buf) -> None:
    pinned = json.loads((TOOLS / "package.json").read_text())["devDependencies"]["@bufbuild/buf"]
    locked = json.loads((TOOLS / "package-lock.json").read_text())["packages"]["node_modules/@bufbuild/buf"]
    assert locked["version"] == pinned
    assert buf("--version").stdout.strip() == pinned


def test_protos_pass_buf_lint(buf: Buf) -> None:
    result = buf("lint", "protos", "--error-format", "json")
    assert (result.returncode, violations(result)) == (0, []), result.stderr


def test_lint_exceptions_are_deliberate_and_needed(buf: Buf) -> None:
    """buf.yaml relaxes exactly the naming rules we chose to break, each of which the protos
    do break, and exempts no file."""
    config = yaml.safe_load((REPO / "protos" / "buf.yaml").read_text())
    assert config["version"] == "v2"
    assert set(config["lint"]["except"]) == DELIBERATE_EXCEPTIONS
    assert "ignore" not in config["lint"] and "ignore_only" not in config["lint"]

    strict = json.dumps({"version": "v2", "lint": {"use": config["lint"]["use"]}})
    result = buf("lint", ".", "--config", strict, "--error-format", "json", cwd=REPO / "protos")
    assert {v["type"] for v in violations(result)} == DELIBERATE_EXCEPTIONS, result.stderr


def test_no_breaking_change_against_main(buf: Buf) -> None:
    result = buf("breaking", "protos", "--against", against_main(REPO), "--error-format", "json")
    assert (result.returncode, violations(result)) == (0, []), result.stderr


def test_breaking_check_catches_a_removed_field_in_a_fresh_clone(buf: Buf, tmp_path: Path) -> None:
    """The same command, in a fresh clone of a main that has the protos, flags a deleted field."""
    origin = tmp_path / "origin"
    shutil.copytree(REPO / "protos", origin / "protos")
    identity = ["-c", "user.name=specd", "-c", "user.email=specd@example.invalid"]
    for args in (["init", "--quiet", "--initial-branch=main"], ["add", "protos"], [*identity, "commit", "--quiet", "-m", "protos"]):
        assert git(*args, cwd=origin).returncode == 0
    clone = tmp_path / "clone"
    assert git("clone", "--quiet", "--depth", "1", origin.as_uri(), str(clone), cwd=tmp_path).returncode == 0

    common = clone / "protos" / "specd" / "v1" / "common.proto"
    text = common.read_text()
    assert "optional uint64 seed = 4;" in text
    common.write_text(text.replace("optional uint64 seed = 4;", ""))

    result = buf("breaking", "protos", "--against", against_main(clone), "--error-format", "json", cwd=clone)
    assert result.returncode != 0
    found = violations(result)
    assert any(v["type"] == "FIELD_NO_DELETE" and '"seed"' in str(v["message"]) for v in found), found
