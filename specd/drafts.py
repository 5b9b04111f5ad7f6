"""The default draft for the embedded oracle."""

from __future__ import annotations

from pathlib import Path

from specd.config import DEFAULT_DRAFT_LAYERS
from specd.defaults import EMBEDDED_ORACLE

# A distilled draft shipped inside the package (see `specd distill` and the Makefile's recipe).
SHIPPED_DRAFT = Path(__file__).parent / "data" / "drafts" / "smollm2-135m-draft"


def default_draft_source() -> tuple[str, int]:
    """(model source, layers) of the best draft available for the embedded oracle."""
    if (SHIPPED_DRAFT / "specd_draft.json").exists():
        return str(SHIPPED_DRAFT), 0
    return EMBEDDED_ORACLE, DEFAULT_DRAFT_LAYERS
