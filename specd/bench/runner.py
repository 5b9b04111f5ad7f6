"""One benchmark run: start the stack, load the transformers baselines, run the chosen sections,
check the goals. Everything started here is stopped on the way out, also on error or Ctrl-C."""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm

from draft_service.config import DraftConfig
from specd.bench.baselines import TransformersBaselines
from specd.bench.goals import check_goals
from specd.bench.llama_cpp import LlamaCppRows, gguf_file
from specd.bench.prompts import PROMPTS_PATH, PromptSet, load_prompt_set
from specd.bench.results import BenchResults
from specd.bench.sections import (
    BenchContext,
    concurrency_requests,
    concurrency_section,
    rtt_requests,
    rtt_section,
    speed_requests,
    speed_section,
)
from specd.bench.stack import BenchStack, StackSettings
from specd.models.loader import load_model
from specd.models.pretrained import LoadedModel
from specd.models.sources import DRAFT_ARTIFACT_MANIFEST, resolve_source
from specd.runtime.engine import IDLE_TRIM_SECONDS
from specd.runtime.executor import ModelExecutor

SECTIONS = ("speed", "sampled", "rtt", "concurrency")


@dataclass
class BenchOptions:
    out: Path
    oracle: str
    draft: str
    draft_layers: int
    max_tokens: int
    prompts_per_category: int
    sampled_prompts_per_category: int
    rtt_prompts_per_category: int
    sections: tuple[str, ...] = SECTIONS
    seed: int = 0
    temperature: float = 0.7  # of the sampled section
    delays_ms: list[float] = field(default_factory=lambda: [0.0, 2.0, 10.0, 50.0])
    clients: list[int] = field(default_factory=lambda: [1, 4, 8])
    min_requests_per_level: int = 4  # concurrency: at least this many requests per level ...
    requests_per_client: int = 1  # ... and this many per client
    threads: int = os.cpu_count() or 1
    max_depth: int = 8
    passes: int = 1  # passes of the greedy speed section over its prompts (the fastest run counts)
    prompts_path: Path = PROMPTS_PATH
    quick: bool = False
    note: str = ""  # why these sizes (written into results.md)
    api: str = "grpc"  # how the concurrency section's clients reach the coordinator: grpc, or http (OpenAI's API)
    # transformers' assistant model: the draft itself, unless the draft reads the oracle's features
    # (transformers cannot run such a draft); then the best standalone draft. "": the draft.
    assistant: str = ""
    assistant_layers: int = 0
    weights: str = "auto"  # the oracle worker's weights plan (specd.kernels.weights)
    llama_cpp: Path | None = None  # a llama-bench binary: llama.cpp's row beside specd's (specd.bench.llama_cpp)

    def requests_for(self, clients: int) -> int:
        return max(self.min_requests_per_level, clients * self.requests_per_client)


# Vector extensions that decide how fast the CPU kernels are (the same CPU name can hide several
# generations: an AMD EPYC with AVX-512 verified a block of tokens for about the cost of one, one
# without it paid about 3 ms per extra token).
VECTOR_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_details() -> dict[str, Any]:
    """The CPU's name, family and model, its vector extensions and the one torch's kernels use."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", "unknown"),
        "cpu_family": fields.get("cpu family", ""),
        "cpu_model": fields.get("model", ""),
        "cpu_vector": [flag for flag in VECTOR_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_info() -> dict[str, Any]:
    return {
        **cpu_details(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
    }


def describe_draft(source: str, layers: int) -> str:
    kind, path = resolve_source(source)
    if kind == "dir" and path is not None and (path / DRAFT_ARTIFACT_MANIFEST).exists():
        from specd.models.artifact import DraftManifest

        m = DraftManifest.read(path)
        head = f"{len(m.head_token_ids)}-token head" if m.head_token_ids else "full-vocabulary head"
        if m.kind == "features":
            read = f"hidden states {', '.join(map(str, m.feature_layers))}" if m.feature_layers else "final hidden states"
            return f"distilled feature draft {source} (one layer over the {read} of {m.base}, {head})"
        return f"distilled draft {source} ({m.layers} layers of {m.base}, {head})"
    return f"{source}" + (f", first {layers} layers" if layers else "")


def draft_goals(source: str) -> list[tuple[str, str, float | None, bool | None]]:
    """A draft artifact's held-out figures against their goals (specd.models.artifact.DraftManifest.goals); not
    measured for other drafts."""
    from specd.models.artifact import DraftManifest

    kind, path = resolve_source(source)
    if kind != "dir" or path is None or not (path / DRAFT_ARTIFACT_MANIFEST).exists():
        return DraftManifest(base=source, layers=0, vocab_fingerprint="").goals()
    return DraftManifest.read(path).goals()


def prompt_lookup_setting() -> str:
    """The draft workers' prompt lookup, as started here (the DraftConfig defaults)."""
    config = DraftConfig(model="-")
    if not config.lookup_min_ngram:
        return "off"
    return f"n-grams of {config.lookup_min_ngram} to {config.lookup_max_ngram} tokens"


def tokenize(oracle: LoadedModel, prompts: PromptSet) -> dict[str, list[int]]:
    ids = {}
    for prompt in [*prompts.measured, prompts.warmup]:
        encoded = oracle.tokenizer.apply_chat_template(prompt.chat(), add_generation_prompt=True, tokenize=True)
        if hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        ids[prompt.id] = [int(t) for t in encoded]
    return ids


def planned_requests(options: BenchOptions, prompts: PromptSet, with_transformers: bool) -> int:
    total = 0
    if "speed" in options.sections:
        total += speed_requests(
            len(prompts.measured), options.max_depth, with_transformers, options.passes, model_only=with_transformers
        )
        if options.llama_cpp is not None:
            total += len(prompts.measured) * options.passes
    if "sampled" in options.sections:
        sampled = len(prompts.first_of_each(options.sampled_prompts_per_category))
        total += speed_requests(sampled, options.max_depth, with_transformers, model_only=with_transformers)
    if "rtt" in options.sections:
        total += rtt_requests(options.delays_ms, len(prompts.first_of_each(options.rtt_prompts_per_category)))
    if "concurrency" in options.sections:
        total += concurrency_requests(options.clients, options.requests_for, unbatched=1 in options.clients)
    return total


def cancel_on_signals() -> None:
    """SIGTERM and SIGINT cancel the run, so that everything started is stopped on the way out.
    Installed again once Ray runs: Ray's driver puts its own handlers in place when it starts."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)


def llama_cpp_rows(options: BenchOptions) -> LlamaCppRows | None:
    """llama.cpp on the oracle's GGUF file beside the greedy speed section (--llama-cpp), the same threads."""
    if options.llama_cpp is None or "speed" not in options.sections:
        return None
    model = gguf_file(options.oracle)
    if model is None:
        raise SystemExit(f"--llama-cpp needs a GGUF oracle; {options.oracle!r} is not one")
    return LlamaCppRows(options.llama_cpp, model, options.threads, settle_seconds=IDLE_TRIM_SECONDS + 1)


async def run_bench(options: BenchOptions) -> BenchResults:
    started = time.perf_counter()
    cancel_on_signals()
    torch.set_num_threads(options.threads)
    prompts = load_prompt_set(options.prompts_per_category, options.prompts_path)
    results = BenchResults(
        machine=machine_info(),
        setup={
            "oracle": options.oracle,
            "draft": describe_draft(options.draft, options.draft_layers),
            "draft_goals": draft_goals(options.draft),
            "draft_source": options.draft,
            "draft_layers": options.draft_layers,
            "prompt_lookup": prompt_lookup_setting(),
            "quick": options.quick,
            "max_tokens": options.max_tokens,
            "prompts_per_category": options.prompts_per_category,
            "sampled_prompts_per_category": options.sampled_prompts_per_category,
            "rtt_prompts_per_category": options.rtt_prompts_per_category,
            "categories": prompts.categories,
            "prompt_ids": [p.id for p in prompts.measured],
            "sections": list(options.sections),
            "seed": options.seed,
            "sampled_temperature": options.temperature,
            "delays_ms": options.delays_ms,
            "clients": options.clients,
            "concurrency_api": options.api,
            "concurrency_requests": {str(n): options.requests_for(n) for n in options.clients},
            "torch_threads": options.threads,
            "max_depth": options.max_depth,
            "passes": options.passes,
            "oracle_weights": options.weights,
            "note": options.note,
        },
    )
    with_transformers = "speed" in options.sections or "sampled" in options.sections
    llama = llama_cpp_rows(options)
    settings = StackSettings(
        options.oracle, options.draft, options.draft_layers, options.threads, options.max_depth, options.weights,
        model_only_draft=with_transformers,  # the speed sections compare adaptive with and without prompt lookup
        # One client on workers with continuous batching off: what one client got before the engines (goal d).
        unbatched_pair="concurrency" in options.sections and 1 in options.clients,
    )
    async with BenchStack(settings) as stack:
        results.section_seconds["start"] = time.perf_counter() - started
        cancel_on_signals()
        # One thread loads and runs the in-process models, as in a worker (specd/rpc/launch.py): torch work on
        # several threads would give each its own OpenMP team and slow all of them.
        models = ModelExecutor("bench-models")
        await models.run(torch.set_num_threads, options.threads)
        oracle = await models.run(load_model, options.oracle)
        baselines = None
        if with_transformers:
            assistant, layers = (options.assistant, options.assistant_layers) if options.assistant else (
                options.draft, options.draft_layers
            )
            draft = await models.run(functools.partial(load_model, assistant, layers=layers))
            baselines = await models.run(TransformersBaselines, oracle, draft)
            results.setup["transformers_assisted"] = baselines.settings()
        with tqdm(total=planned_requests(options, prompts, with_transformers), desc="specd bench", unit="req") as progress:
            ctx = BenchContext(
                stack=stack,
                prompts=prompts,
                prompt_ids=tokenize(oracle, prompts),
                baselines=baselines,
                max_tokens=options.max_tokens,
                max_depth=options.max_depth,
                seed=options.seed,
                progress=progress,
                models=models,
                oracle=oracle,
                api=options.api,
                llama=llama,
            )
            sections = {
                "speed": lambda: speed_section(ctx, 0.0, passes=options.passes),
                "sampled": lambda: speed_section(ctx, options.temperature, options.sampled_prompts_per_category),
                "rtt": lambda: rtt_section(ctx, options.delays_ms, options.rtt_prompts_per_category),
                "concurrency": lambda: concurrency_section(ctx, options.clients, options.requests_for),
            }
            for name in SECTIONS:
                if name in options.sections:
                    section_started = time.perf_counter()
                    setattr(results, name, await sections[name]())
                    results.section_seconds[name] = time.perf_counter() - section_started
        if baselines is not None:
            await models.run(baselines.close)
        models.shutdown()
        await asyncio.sleep(IDLE_TRIM_SECONDS + 1)  # the workers' engines hand back what their passes freed
        results.memory_mb = stack.resident_memory_mb()
    if llama is not None:  # each prompt's request once more, with specd's stack stopped
        await asyncio.to_thread(llama.record_again)
        results.llama_cpp = llama.result()
    results.goals = check_goals(results)
    results.machine["load_average_at_end"] = list(os.getloadavg())
    results.duration_seconds = time.perf_counter() - started
    return results
