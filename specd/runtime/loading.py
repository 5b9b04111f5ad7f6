"""A worker's model, loaded and set up for serving: its CPU weights and linear layers, attention and threads."""

from __future__ import annotations

from pathlib import Path

import torch

from specd.core.memory import release_freed_memory
from specd.kernels.attention import use_grouped_attention
from specd.kernels.cpu_linear import use_cpu_linear
from specd.kernels.int8_linear import use_int8_linear
from specd.kernels.weights import resolve_plan, use_weights
from specd.models.loader import load_model
from specd.models.pretrained import LoadedModel
from specd.models.sources import resolve_source
from specd.runtime.model_spec import ModelSpec


def load_worker_model(spec: ModelSpec) -> LoadedModel:
    """Load the model and set up its CPU layers (specd.kernels)."""
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    loaded = load_model(
        spec.source,
        dtype=spec.dtype,
        device=spec.device,
        layers=spec.layers,
        max_context=spec.max_context,
        cache_dir=Path(spec.cache_dir) if spec.cache_dir else None,
    )
    if spec.int8 and loaded.device.type == "cpu":
        use_int8_linear(loaded.model)
    if loaded.device.type == "cpu":
        plan = resolve_plan(spec.weights, quantized_source=resolve_source(spec.source)[0] == "gguf")
        if plan != "float32":
            use_weights(loaded.model, plan)  # before the float32 plan below, which then takes the layers left
    use_cpu_linear(loaded.model, spec.cpu_linear)
    if spec.grouped_attention:
        use_grouped_attention(loaded.model)
    release_freed_memory()
    return loaded

