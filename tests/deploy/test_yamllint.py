"""yamllint with deploy/.yamllint over the YAML that is YAML: values, Chart.yaml, buf.yaml and
the chart's rendered output (the templates themselves are Go templates, linted once rendered)."""

from __future__ import annotations

from pathlib import Path

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.deploy.conftest import DEPLOY, REPO, render_chart
from tests.deploy.test_chart import FULL_VALUES

CONFIG = YamlLintConfig(file=str(DEPLOY / ".yamllint"))


def problems(text: str) -> list[str]:
    return [f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(text, CONFIG)]


def yaml_sources() -> list[Path]:
    """Every YAML file under deploy/ the config does not exclude, plus protos/buf.yaml."""
    found = [
        path
        for pattern in ("*.yaml", "*.yml")
        for path in DEPLOY.rglob(pattern)
        if not CONFIG.is_file_ignored(str(path.relative_to(DEPLOY)))
    ]
    return sorted(found) + [REPO / "protos" / "buf.yaml"]


def test_templates_are_left_to_the_rendered_check() -> None:
    sources = {path.relative_to(REPO).as_posix() for path in yaml_sources()}
    assert {"deploy/helm/specd/values.yaml", "deploy/helm/specd/Chart.yaml", "protos/buf.yaml"} <= sources
    assert not any("/templates/" in source or "node_modules" in source for source in sources)


@pytest.mark.parametrize("path", yaml_sources(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_yaml_sources_are_clean(path: Path) -> None:
    assert problems(path.read_text()) == []


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "all-options"])
def test_rendered_chart_is_clean(values: dict | None) -> None:
    rendered = render_chart(values)
    manifests = {path: text for path, text in rendered.items() if path.endswith(".yaml")}
    assert len(manifests) >= 6
    assert {path: problems(text) for path, text in manifests.items()} == {path: [] for path in manifests}


def test_lint_config_is_not_vacuous() -> None:
    """The same config flags what it should: bad indentation, truthy words, over-long lines."""
    sloppy = "a:\n   b: yes\nc: " + "x" * 130 + "\n"
    rules = {p.rule for p in linter.run(sloppy, CONFIG)}
    assert {"indentation", "truthy", "line-length"} <= rules
