"""The default drafts for the embedded oracle, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from specd.config import DEFAULT_DRAFT_LAYERS
from specd.defaults import EMBEDDED_ORACLE
from specd.models import DRAFT_ARTIFACT_MANIFEST

DRAFTS = Path(__file__).parent / "data" / "drafts"
# Made by `specd distill --kind features` (the Makefile's `draft` recipe): reads the oracle's features.
FEATURE_DRAFT = DRAFTS / "smollm2-135m-feature-draft"
# Made by `specd distill --kind layers` (`make draft-standalone`): reads tokens alone, so it also
# serves as an assistant model for transformers' assisted generation.
STANDALONE_DRAFT = DRAFTS / "smollm2-135m-draft"


def default_draft_source() -> tuple[str, int]:
    """(model source, layers) of the best draft available for the embedded oracle."""
    for shipped in (FEATURE_DRAFT, STANDALONE_DRAFT):
        if (shipped / DRAFT_ARTIFACT_MANIFEST).exists():
            return str(shipped), 0
    return EMBEDDED_ORACLE, DEFAULT_DRAFT_LAYERS


def standalone_draft_source() -> tuple[str, int]:
    """(model source, layers) of the best draft for the embedded oracle that reads tokens alone."""
    if (STANDALONE_DRAFT / DRAFT_ARTIFACT_MANIFEST).exists():
        return str(STANDALONE_DRAFT), 0
    return EMBEDDED_ORACLE, DEFAULT_DRAFT_LAYERS


def is_feature_draft(source: str) -> bool:
    """Whether `source` is a draft artifact that reads the oracle's features."""
    manifest = Path(source) / DRAFT_ARTIFACT_MANIFEST
    if not manifest.exists():
        return False
    from specd.draft_artifact import DraftManifest

    return DraftManifest.read(Path(source)).kind == "features"
