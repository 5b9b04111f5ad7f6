"""Shared fixtures: tiny random-weight models and real loopback gRPC workers."""

from __future__ import annotations

from pathlib import Path

from specd.core.defaults import keep_local_ray_on_loopback, quiet_idle_threads

keep_local_ray_on_loopback()  # before anything imports ray
quiet_idle_threads()  # before anything imports torch

import pytest  # noqa: E402
import torch  # noqa: E402

from draft_service.config import DraftConfig  # noqa: E402
from oracle_service.config import OracleConfig  # noqa: E402
from specd.cluster.roles import start_local_worker  # noqa: E402
from specd.models.tiny import write_tiny_feature_draft, write_tiny_model  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_model(root / "oracle", seed=1, layers=2, hidden=64)
    write_tiny_model(root / "unrelated", seed=2, layers=1, hidden=32)
    write_tiny_feature_draft(root / "oracle", root / "feature")
    # EAGLE-3 style: it reads the oracle's embeddings, the output of its layer 1 and its final state
    write_tiny_feature_draft(root / "oracle", root / "layers", feature_layers=(0, 1, 2), head_norm=True)
    return root


def oracle_config(tiny_dir: Path, **overrides) -> OracleConfig:
    return OracleConfig(model=str(tiny_dir / "oracle"), port=0, grace_seconds=0.5, **overrides)


def draft_config(tiny_dir: Path, name: str = "unrelated", **overrides) -> DraftConfig:
    return DraftConfig(model=str(tiny_dir / name), layers=0, port=0, grace_seconds=0.5, **overrides)


@pytest.fixture(scope="session")
async def oracle(tiny_dir: Path):
    worker = await start_local_worker(oracle_config(tiny_dir))
    yield worker
    await worker.stop()


@pytest.fixture(scope="session")
async def same_draft(tiny_dir: Path):
    """A draft identical to the oracle, without prompt lookup: every proposal should be accepted."""
    worker = await start_local_worker(draft_config(tiny_dir, "oracle", lookup_min_ngram=0))
    yield worker
    await worker.stop()


@pytest.fixture(scope="session")
async def unrelated_draft(tiny_dir: Path):
    """A draft with unrelated random weights (same vocabulary), without prompt lookup: almost nothing accepted."""
    worker = await start_local_worker(draft_config(tiny_dir, "unrelated", lookup_min_ngram=0))
    yield worker
    await worker.stop()


@pytest.fixture(scope="session")
async def lookup_draft(tiny_dir: Path):
    """The unrelated draft with prompt lookup (the default settings): lookup's copies are often right."""
    worker = await start_local_worker(draft_config(tiny_dir, "unrelated"))
    yield worker
    await worker.stop()


@pytest.fixture(scope="session")
async def feature_draft(tiny_dir: Path):
    """A draft that reads the oracle's features (untrained: it proposes, the oracle decides)."""
    worker = await start_local_worker(draft_config(tiny_dir, "feature"))
    yield worker
    await worker.stop()


@pytest.fixture(scope="session")
async def layers_draft(tiny_dir: Path):
    """A draft that reads several of the oracle's hidden states, EAGLE-3 style: its embeddings, the output of its
    layer 1 and its final state (untrained)."""
    worker = await start_local_worker(draft_config(tiny_dir, "layers", lookup_min_ngram=0))
    yield worker
    await worker.stop()


_REFERENCE_MODELS: dict[str, object] = {}


def greedy_reference(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle alone: plain transformers greedy `generate`, ignoring EOS."""
    from specd.models.loader import load_model

    key = str(model_dir)
    if key not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[key] = load_model(key)
    loaded = _REFERENCE_MODELS[key]
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()
