"""Loading a pretrained causal LM (a GGUF file, a local directory or a hub id) and its tokenizer.

GGUF files are de-quantized on load, which is slow; the result is cached as safetensors under
`cache_dir` so later loads of the same file take about a second. Draft artifacts, which are
rebuilt from such a model, load through specd.models.artifact; specd.models.loader picks
between the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from specd.core.errors import InvalidArgument
from specd.models.sources import default_cache_dir, resolve_source

log = logging.getLogger(__name__)

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
    # For drafts that condition on the oracle's final hidden states (specd.models.feature_draft): their width.
    feature_dim: int = 0
    # Of those, the oracle hidden states they read (specd.core.validation.feature_layers); empty: the final one.
    feature_layers: tuple[int, ...] = ()


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


def load_pretrained(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    layers: int = 0,
    max_context: int = 0,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a pretrained causal LM and its tokenizer. `layers` > 0 keeps only the first N decoder layers."""
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_device = check_device(device)
    kind, path = resolve_source(source)
    torch_dtype = DTYPES[dtype]
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
