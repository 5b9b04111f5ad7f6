"""The one entry point for loading a worker's model from any source (specd.models.sources)."""

from __future__ import annotations

from pathlib import Path

from specd.models.artifact import load_draft_artifact
from specd.models.pretrained import LoadedModel, load_pretrained
from specd.models.sources import artifact_dir


def load_model(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    layers: int = 0,
    max_context: int = 0,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, or a draft artifact rebuilt on its oracle.
    `layers` > 0 keeps only the first N decoder layers of a pretrained model."""
    artifact = artifact_dir(source)
    if artifact is not None:
        return load_draft_artifact(artifact, dtype=dtype, device=device, max_context=max_context, cache_dir=cache_dir)
    return load_pretrained(
        source, dtype=dtype, device=device, layers=layers, max_context=max_context, cache_dir=cache_dir
    )
