"""What a worker loads and how it runs it; plain data, importable without torch (settings build it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how to run it (a worker's settings, specd.rpc.settings.WorkerConfig, name each field)."""

    source: str
    dtype: str = "float32"
    device: str = "cpu"
    layers: int = 0
    max_context: int = 0
    cache_dir: str = ""
    torch_threads: int = 0
    cpu_linear: str = "auto"
    grouped_attention: bool = True
    int8: bool = False  # a draft's large linear layers in int8 (never an oracle's: its arithmetic is what it writes)
    weights: str = "auto"  # on CPU, the linear layers' weights plan (specd.kernels.weights)
