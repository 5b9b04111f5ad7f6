"""The default drafts for the embedded oracle, shipped inside the package."""

from __future__ import annotations

from specd.core.defaults import DEFAULT_DRAFT, EMBEDDED_ORACLE, STANDALONE_DRAFT
from specd.models.artifact import DraftManifest
from specd.models.sources import DRAFT_ARTIFACT_MANIFEST, artifact_dir, shipped_draft_path

# Without any shipped draft: the oracle's own first layers with its embedding and output head
# (an untrained early-exit draft of the same vocabulary).
FALLBACK_DRAFT_LAYERS = 4


def _first_shipped(names: tuple[str, ...]) -> tuple[str, int]:
    for name in names:
        if (shipped_draft_path(name) / DRAFT_ARTIFACT_MANIFEST).exists():
            return name, 0
    return EMBEDDED_ORACLE, FALLBACK_DRAFT_LAYERS


def default_draft_source() -> tuple[str, int]:
    """(model source, layers) of the best draft available for the embedded oracle.

    The default (`make draft`) reads the oracle's features; the standalone one
    (`make draft-standalone`) reads tokens alone.
    """
    return _first_shipped((DEFAULT_DRAFT, STANDALONE_DRAFT))


def standalone_draft_source() -> tuple[str, int]:
    """(model source, layers) of the best draft for the embedded oracle that reads tokens alone;
    it also serves as the assistant model of transformers' assisted generation."""
    return _first_shipped((STANDALONE_DRAFT,))


def is_feature_draft(source: str) -> bool:
    """Whether `source` is a draft artifact that reads the oracle's features."""
    path = artifact_dir(source)
    return path is not None and DraftManifest.read(path).kind == "features"
