"""The benchmark's sections. Each runs against coordinators of a `BenchStack` and returns typed
results (specd.bench.results).

- speed: one client, every configuration on every prompt, at one temperature. Configurations
  take turns prompt by prompt (round robin), so a change in background load hits them all alike;
  with several passes over the prompts, each (configuration, prompt) keeps its fastest run, since
  other work on the machine can only add time.
- rtt: an injected round trip on every coordinator -> oracle call; the adaptive policy against
  the oracle alone at the same delay.
- concurrency: 1 to 32 clients streaming at once; aggregate throughput and latency percentiles, beside
  transformers' static batch of the same size.

Prompts are tokenized once here with the oracle's chat template and sent as token ids, so specd
and the transformers baselines decode exactly the same input.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import httpx
from tqdm import tqdm

from coordinator.server import RunningCoordinator
from specd.bench.baselines import TransformersBaselines, static_batch
from specd.bench.llama_cpp import LlamaCppRows
from specd.bench.measure import RequestRecord, StreamRecord, StreamSummary, set_ratios, summarise, summarise_streams
from specd.bench.prompts import BenchPrompt, PromptSet
from specd.bench.results import (
    ADAPTIVE,
    ADAPTIVE_CHAINS,
    ADAPTIVE_FIXED_BLOCKS,
    ADAPTIVE_MODEL_ONLY,
    CONCURRENT_ADAPTIVE,
    CONCURRENT_ORACLE_ALONE,
    HF_ASSISTED,
    HF_PLAIN,
    ORACLE_ALONE,
    STATIC_BATCH,
    UNBATCHED,
    BestFixed,
    ConcurrencyPoint,
    ConcurrencyResult,
    ConfigResult,
    RttPoint,
    RttResult,
    SpeedResult,
    fixed_key,
)
from specd.bench.stack import BenchStack
from specd.client import AsyncSpecdClient, Result
from specd.models.pretrained import LoadedModel
from specd.runtime.executor import ModelExecutor

REQUEST_TIMEOUT_SECONDS = 900.0
WARMUP_SHORT_TOKENS = 16


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    engine: str  # "specd" or "transformers"
    depth: int | None = None  # specd: fixed k, None = the coordinator's policy
    assisted: bool = False  # transformers: with the draft as assistant
    lookup: bool = True  # specd: prompt lookup on (the default), or off in the coordinator and the draft
    policy: str = "goodput"  # specd: the coordinator's depth policy (for depth=None)

    @property
    def coordinator(self) -> tuple[bool, str]:
        """Configurations with the same value share a coordinator."""
        return self.lookup, self.policy


def speed_configs(max_depth: int, with_transformers: bool, model_only: bool = False) -> list[Config]:
    configs = []
    if with_transformers:
        configs += [
            Config(HF_PLAIN, "transformers generate (oracle alone)", "transformers"),
            Config(HF_ASSISTED, "transformers assisted generation (standalone draft)", "transformers", assisted=True),
        ]
    configs.append(Config(ORACLE_ALONE, "specd, oracle alone (k=0)", "specd", depth=0))
    configs += [Config(fixed_key(k), f"specd, fixed k={k}", "specd", depth=k) for k in range(1, max_depth + 1)]
    configs.append(Config(ADAPTIVE, "specd, adaptive (goodput)", "specd", depth=None))
    if model_only:
        configs += [
            Config(ADAPTIVE_MODEL_ONLY, "specd, adaptive, model draft only (no prompt lookup)", "specd", lookup=False),
            Config(
                ADAPTIVE_FIXED_BLOCKS, "specd, adaptive, no stop rule (blocks of the modelled best k)", "specd",
                policy=FIXED_BLOCKS_POLICY,
            ),
            Config(ADAPTIVE_CHAINS, "specd, adaptive, chains only (no draft trees)", "specd", policy=CHAINS_POLICY),
        ]
    return configs


FIXED_BLOCKS_POLICY = "goodput:confidence_stop=0"
CHAINS_POLICY = "goodput:tree_width=0"  # the default policy with draft trees off


@dataclass
class BenchContext:
    stack: BenchStack
    prompts: PromptSet
    prompt_ids: dict[str, list[int]]  # prompt id -> token ids (chat template applied)
    baselines: TransformersBaselines | None
    max_tokens: int
    max_depth: int
    seed: int
    progress: tqdm
    models: ModelExecutor  # the one thread that loads and runs the transformers baselines
    oracle: LoadedModel | None = None  # the oracle in this process, for transformers' static batches
    api: str = "grpc"  # the concurrency section's clients: the gRPC API, or the OpenAI-compatible HTTP API
    llama: LlamaCppRows | None = None  # llama.cpp's requests beside the greedy speed section's (--llama-cpp)

    def step(self, what: str) -> None:
        self.progress.set_postfix_str(what, refresh=False)
        self.progress.update(1)


# -- single requests ---------------------------------------------------------------------------


def _specd_record(prompt: BenchPrompt, result: Result, seconds: float, depth: int | None) -> RequestRecord:
    s = result.stats
    depths = list(s.depth_per_round)
    return RequestRecord(
        prompt_id=prompt.id,
        category=prompt.category,
        tokens=len(result.token_ids),
        seconds=seconds,
        finish=result.finish_reason,
        drafted=s.drafted,
        accepted=s.accepted,
        rounds=s.rounds,
        rounds_with_draft=sum(1 for k in depths if k > 0),
        depths=depths,
        draft_seconds=s.draft_seconds,
        verify_seconds=s.verify_seconds,
        network_seconds=s.network_seconds,
        loop_seconds=max(0.0, s.total_seconds - s.open_seconds),
        speculative=depth != 0,
    )


async def specd_request(
    client: AsyncSpecdClient, ctx: BenchContext, prompt: BenchPrompt, *, depth: int | None, temperature: float,
    seed: int | None, max_tokens: int | None = None,
) -> tuple[RequestRecord, list[int]]:
    started = time.perf_counter()
    result = await client.generate(
        token_ids=ctx.prompt_ids[prompt.id],
        max_tokens=max_tokens or ctx.max_tokens,
        temperature=temperature,
        seed=seed if temperature > 0 else None,
        depth=depth,
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    seconds = time.perf_counter() - started
    return _specd_record(prompt, result, seconds, depth), result.token_ids


async def baseline_request(
    ctx: BenchContext, prompt: BenchPrompt, *, assisted: bool, temperature: float, seed: int, max_tokens: int | None = None
) -> tuple[RequestRecord, list[int]]:
    assert ctx.baselines is not None
    run = await ctx.models.run(functools.partial(
        ctx.baselines.generate, ctx.prompt_ids[prompt.id], assisted=assisted,
        max_tokens=max_tokens or ctx.max_tokens, temperature=temperature, seed=seed,
    ))
    drafted = sum(run.depths)
    record = RequestRecord(
        prompt_id=prompt.id,
        category=prompt.category,
        tokens=len(run.token_ids),
        seconds=run.seconds,
        finish=run.finish,
        rounds=run.oracle_calls,
        speculative=assisted,
    )
    if assisted:
        # Every verification round commits the accepted draft tokens and one token of the oracle's own.
        record.drafted = drafted
        record.accepted = max(0, min(drafted, run.emitted - run.oracle_calls))
        record.rounds_with_draft = sum(1 for k in run.depths if k > 0)
        record.depths = run.depths
    return record, run.token_ids


async def run_config(
    clients: dict[tuple[bool, str], AsyncSpecdClient], ctx: BenchContext, config: Config, prompt: BenchPrompt,
    temperature: float, seed: int,
) -> tuple[RequestRecord, list[int]]:
    """One request of a configuration, through the client of its coordinator (Config.coordinator)."""
    if config.engine == "transformers":
        return await baseline_request(ctx, prompt, assisted=config.assisted, temperature=temperature, seed=seed)
    return await specd_request(
        clients[config.coordinator], ctx, prompt, depth=config.depth, temperature=temperature, seed=seed
    )


def config_result(config: Config, records: list[RequestRecord], categories: list[str]) -> ConfigResult:
    return ConfigResult(
        key=config.key,
        label=config.label,
        engine=config.engine,
        depth=config.depth,
        by_category={c: summarise([r for r in records if r.category == c]) for c in categories if any(r.category == c for r in records)},
        overall=summarise(records),
        requests=records,
    )


def set_config_ratios(configs: list[ConfigResult], reference: ConfigResult) -> None:
    for config in configs:
        set_ratios(config.by_category, reference.by_category)
        set_ratios({"all": config.overall}, {"all": reference.overall})


# -- warm-up -------------------------------------------------------------------------------------


async def warm_up(client: AsyncSpecdClient, ctx: BenchContext, temperature: float, *, kernels: bool) -> str:
    """Warm the models' first calls (kernels=True) and the adaptive policy: one adaptive request
    on the warm-up prompt, whose learned state the coordinator keeps for the measured requests."""
    prompt = ctx.prompts.warmup
    if kernels:
        short = min(WARMUP_SHORT_TOKENS, ctx.max_tokens)
        for depth in (0, ctx.max_depth):
            await specd_request(client, ctx, prompt, depth=depth, temperature=temperature, seed=ctx.seed, max_tokens=short)
            ctx.step("warm-up")
        if ctx.baselines is not None:
            for assisted in (False, True):
                await baseline_request(ctx, prompt, assisted=assisted, temperature=temperature, seed=ctx.seed, max_tokens=short)
                ctx.step("warm-up")
    await specd_request(client, ctx, prompt, depth=None, temperature=temperature, seed=ctx.seed)
    ctx.step("warm-up")
    return (
        f"The adaptive policy was warmed up with one request ({ctx.max_tokens} tokens) on a warm-up prompt that is "
        "not measured; the coordinator keeps what it learned"
    )


def warmup_requests(with_transformers: bool, kernels: bool) -> int:
    return 1 + (2 + (2 if with_transformers else 0) if kernels else 0)


# -- sections ------------------------------------------------------------------------------------


def speed_requests(
    ctx_prompts: int, max_depth: int, with_transformers: bool, passes: int = 1, model_only: bool = False
) -> int:
    configs = speed_configs(max_depth, with_transformers, model_only)
    coordinators = len({c.coordinator for c in configs if c.engine == "specd"})
    warmups = warmup_requests(with_transformers, True) + (coordinators - 1) * warmup_requests(False, False)
    return warmups + passes * ctx_prompts * len(configs)


async def speed_section(
    ctx: BenchContext, temperature: float, per_category: int | None = None, passes: int = 1
) -> SpeedResult:
    """Every configuration on the first `per_category` prompts of each category (default: all),
    `passes` times over the prompts; per (configuration, prompt) the fastest run counts."""
    prompts = ctx.prompts.first_of_each(per_category) if per_category else ctx.prompts.measured
    model_only = ctx.stack.model_only_draft is not None
    configs = speed_configs(ctx.max_depth, ctx.baselines is not None, model_only)
    fastest: dict[tuple[str, int], RequestRecord] = {}
    variants = list(dict.fromkeys(c.coordinator for c in configs if c.engine == "specd"))
    running: dict[tuple[bool, str], RunningCoordinator] = {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients: dict[tuple[bool, str], AsyncSpecdClient] = {}
            for lookup, policy in variants:
                label = f"speed-t{temperature:g}" + ("" if lookup else "-no-lookup") + (
                    "" if policy == "goodput" else "-" + policy.replace(":", "-").replace("=", "")
                )
                running[(lookup, policy)] = await ctx.stack.coordinator(label, lookup=lookup, policy=policy)
                clients[(lookup, policy)] = await stack.enter_async_context(
                    AsyncSpecdClient(running[(lookup, policy)].address)
                )
            warmup = ""
            for n, variant in enumerate(variants):
                text = await warm_up(clients[variant], ctx, temperature, kernels=n == 0)
                warmup = warmup or text
            for number in range(passes):
                for index, prompt in enumerate(prompts):
                    seed = ctx.seed + index
                    outputs: dict[str, tuple[RequestRecord, list[int]]] = {}
                    for config in configs:
                        outputs[config.key] = await run_config(clients, ctx, config, prompt, temperature, seed)
                        ctx.step(f"T={temperature:g} pass {number + 1}/{passes} {prompt.id} {config.key}")
                    if ctx.llama is not None and temperature == 0:  # the same request through llama.cpp, now
                        written = outputs[ORACLE_ALONE][0].tokens
                        await asyncio.to_thread(ctx.llama.record, index, len(ctx.prompt_ids[prompt.id]), written)
                        ctx.step(f"T=0 pass {number + 1}/{passes} {prompt.id} llama.cpp")
                    for key, (record, tokens) in outputs.items():
                        if temperature == 0 and HF_PLAIN in outputs and key != HF_PLAIN:
                            record.same_as_reference = tokens == outputs[HF_PLAIN][1]
                        kept = fastest.get((key, index))
                        if kept is None or record.seconds < kept.seconds:
                            fastest[(key, index)] = record
    finally:
        for coordinator in running.values():
            await ctx.stack.close_coordinator(coordinator)
    records = {c.key: [fastest[(c.key, i)] for i in range(len(prompts))] for c in configs}
    categories = ctx.prompts.categories
    results = [config_result(c, records[c.key], categories) for c in configs]
    reference = next(r for r in results if r.key == ORACLE_ALONE)
    set_config_ratios(results, reference)
    return SpeedResult(
        temperature=temperature,
        prompts_per_category=len(prompts) // len(categories),
        seed=ctx.seed if temperature > 0 else None,
        warmup=warmup,
        configs=results,
        best_fixed=best_fixed(results, categories),
        passes=passes,
    )


def best_fixed(results: list[ConfigResult], categories: list[str]) -> list[BestFixed]:
    """Per category (and over all), the fastest fixed k (0 included) and adaptive's share of it."""
    fixed = [r for r in results if r.engine == "specd" and r.depth is not None]
    adaptive = next((r for r in results if r.key == ADAPTIVE), None)
    if not fixed or adaptive is None:
        return []
    out = []
    for category in [*categories, "all"]:
        cell = (lambda r: r.overall) if category == "all" else (lambda r, category=category: r.by_category[category])
        winner = max(fixed, key=lambda r: cell(r).tokens_per_second)
        best, mine = cell(winner).tokens_per_second, cell(adaptive).tokens_per_second
        out.append(BestFixed(category, int(winner.depth or 0), best, mine, mine / best if best > 0 else 0.0))
    return out


def rtt_requests(delays: list[float], prompts: int) -> int:
    return len(delays) * (warmup_requests(False, False) + 2 * prompts)


async def rtt_section(ctx: BenchContext, delays_ms: list[float], per_category: int) -> RttResult:
    prompts = ctx.prompts.first_of_each(per_category)
    categories = ctx.prompts.categories
    alone = Config(ORACLE_ALONE, "specd, oracle alone (k=0)", "specd", depth=0)
    adaptive = Config(ADAPTIVE, "specd, adaptive (goodput)", "specd", depth=None)
    points, warmup = [], ""
    for delay in delays_ms:
        running = await ctx.stack.coordinator(f"rtt-{delay:g}ms", oracle_delay_ms=delay)
        records: dict[str, list[RequestRecord]] = {alone.key: [], adaptive.key: []}
        try:
            async with AsyncSpecdClient(running.address) as client:
                warmup = await warm_up(client, ctx, 0.0, kernels=False)
                for prompt in prompts:
                    for config in (alone, adaptive):
                        record, _ = await run_config({config.coordinator: client}, ctx, config, prompt, 0.0, ctx.seed)
                        records[config.key].append(record)
                        ctx.step(f"RTT {delay:g} ms {prompt.id} {config.key}")
        finally:
            await ctx.stack.close_coordinator(running)
        base = config_result(alone, records[alone.key], categories)
        mine = config_result(adaptive, records[adaptive.key], categories)
        set_config_ratios([base, mine], base)
        points.append(RttPoint(
            delay_ms=delay,
            oracle_alone=base,
            adaptive=mine,
            ratio_by_category={c: cell.ratio for c, cell in mine.by_category.items() if cell.ratio is not None},
            ratio_overall=mine.overall.ratio or 0.0,
        ))
    return RttResult(prompts_per_category=per_category, warmup=warmup, points=points)


CONCURRENCY_POLICIES = ((CONCURRENT_ADAPTIVE, None), (CONCURRENT_ORACLE_ALONE, 0))


def concurrency_requests(levels: list[int], requests_for: Callable[[int], int], unbatched: bool = False) -> int:
    one_client = len(CONCURRENCY_POLICIES) * requests_for(1) + warmup_requests(False, False) if unbatched else 0
    return warmup_requests(False, False) + sum(len(CONCURRENCY_POLICIES) * requests_for(n) + 1 for n in levels) + one_client


async def _stream(client: AsyncSpecdClient, ctx: BenchContext, prompt: BenchPrompt, depth: int | None) -> StreamRecord:
    record = StreamRecord(prompt_id=prompt.id, sent=time.perf_counter())
    try:
        async for chunk in client.stream(
            token_ids=ctx.prompt_ids[prompt.id], max_tokens=ctx.max_tokens, temperature=0.0, depth=depth,
            timeout=REQUEST_TIMEOUT_SECONDS,
        ):
            now = time.perf_counter()
            if chunk.token_ids:
                record.arrivals.append((now, len(chunk.token_ids)))
            if chunk.stats is not None:
                record.depths = list(chunk.stats.depth_per_round)
    except grpc.aio.AioRpcError as error:
        record.error = f"{error.code().name}: {error.details()}"
    record.finished = time.perf_counter()
    return record


async def _stream_http(
    http: httpx.AsyncClient, url: str, ctx: BenchContext, prompt: BenchPrompt, depth: int | None
) -> StreamRecord:
    """The same request through the OpenAI-compatible HTTP API (server-sent events)."""
    record = StreamRecord(prompt_id=prompt.id, sent=time.perf_counter())
    body: dict = {
        "prompt": ctx.prompt_ids[prompt.id], "max_tokens": ctx.max_tokens, "temperature": 0.0, "stream": True,
        "return_token_ids": True,
    }
    if depth is not None:
        body["speculation_depth"] = depth
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_SECONDS) as reply:
            if reply.status_code != 200:
                record.error = f"HTTP {reply.status_code}: {(await reply.aread()).decode()[:200]}"
            else:
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:
                        record.error = chunk["error"]["message"]
                        continue
                    now = time.perf_counter()
                    choice = chunk["choices"][0] if chunk.get("choices") else {}
                    if choice.get("token_ids"):
                        record.arrivals.append((now, len(choice["token_ids"])))
                    figures = chunk.get("metrics", {}).get("speculative_decoding")
                    if figures:
                        record.depths = list(figures["depth_per_round"])
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    record.finished = time.perf_counter()
    return record


async def concurrency_section(ctx: BenchContext, levels: list[int], requests_for: Callable[[int], int]) -> ConcurrencyResult:
    """Each level: `clients` tasks share a queue of requests_for(clients) prompts (cycling through
    the prompt set) and stream them one after another; temperature 0. Through the gRPC API, or with
    ctx.api == "http" through the OpenAI-compatible HTTP API."""
    running = await ctx.stack.coordinator("concurrency", http=ctx.api == "http")
    points = []
    try:
        async with AsyncSpecdClient(running.address) as client:
            warmup = await warm_up(client, ctx, 0.0, kernels=False)
        for clients in levels:
            for policy, depth in CONCURRENCY_POLICIES:
                summary = await _level(running, ctx, clients, requests_for(clients), depth, policy)
                points.append(ConcurrencyPoint(policy, clients, summary))
            if ctx.oracle is not None:
                points.append(ConcurrencyPoint(STATIC_BATCH, clients, await _static_batch(ctx, clients)))
    finally:
        await ctx.stack.close_coordinator(running)
    if 1 in levels and ctx.stack.unbatched is not None:
        points += await _one_client_unbatched(ctx, requests_for(1))
    return ConcurrencyResult(warmup=warmup, points=points)


async def _one_client_unbatched(ctx: BenchContext, requests: int) -> list[ConcurrencyPoint]:
    """One client on a pair of workers with continuous batching off: what one client got before the engines."""
    running = await ctx.stack.coordinator("concurrency-unbatched", batching=False, http=ctx.api == "http")
    try:
        async with AsyncSpecdClient(running.address) as client:
            await warm_up(client, ctx, 0.0, kernels=False)
        return [
            ConcurrencyPoint(policy + UNBATCHED, 1, await _level(running, ctx, 1, requests, depth, policy + UNBATCHED))
            for policy, depth in CONCURRENCY_POLICIES
        ]
    finally:
        await ctx.stack.close_coordinator(running)


async def _static_batch(ctx: BenchContext, clients: int) -> StreamSummary:
    """The peer of a level: one transformers `generate` over `clients` prompts at once, each writing max_tokens
    tokens (the same prompts the level's first requests use), while the workers are idle."""
    assert ctx.oracle is not None
    prompts = [ctx.prompt_ids[p.id] for p in itertools.islice(itertools.cycle(ctx.prompts.measured), clients)]
    tokens, seconds = await ctx.models.run(static_batch, ctx.oracle, prompts, ctx.max_tokens)
    ctx.step(f"{clients} clients, {STATIC_BATCH}")
    return StreamSummary(
        requests=clients, failed=0, tokens=tokens, wall_seconds=seconds, tokens_per_second=tokens / seconds,
        ttft_p50_ms=None, ttft_p99_ms=None, itl_p50_ms=None, itl_p99_ms=None, tpot_p50_ms=None, e2e_p50_ms=seconds * 1000,
    )


async def _level(
    running: RunningCoordinator, ctx: BenchContext, clients: int, requests: int, depth: int | None, policy: str
) -> StreamSummary:
    queue = iter(list(itertools.islice(itertools.cycle(ctx.prompts.measured), requests)))
    records: list[StreamRecord] = []

    async def one_client() -> None:
        if ctx.api == "http":
            url = f"http://127.0.0.1:{running.http_port}"
            async with httpx.AsyncClient() as http:  # a connection of its own, like a separate user
                for prompt in queue:
                    records.append(await _stream_http(http, url, ctx, prompt, depth))
                    ctx.step(f"{clients} clients, {policy}")
            return
        async with AsyncSpecdClient(running.address) as client:  # a channel of its own, like a separate user
            for prompt in queue:  # the clients share the iterator: each request is taken once
                records.append(await _stream(client, ctx, prompt, depth))
                ctx.step(f"{clients} clients, {policy}")

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return summarise_streams(records)
