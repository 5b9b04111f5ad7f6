"""results.md: the benchmark's results as Markdown tables, goals first."""

from __future__ import annotations

from pathlib import Path

from specd.bench.measure import Cell
from specd.bench.results import ADAPTIVE, ORACLE_ALONE, BenchResults, SpeedResult

PLOTS = {
    "tokens_per_second_vs_k.png": "tokens per second against k, per category",
    "ratio_vs_rtt.png": "adaptive over the oracle alone against the injected round trip",
    "latency_vs_concurrency.png": "throughput and latency against the number of clients",
}


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _k(cell: Cell) -> str:
    if cell.k_mean is None:
        return "n/a"
    return f"{cell.k_mean:.2f} / {cell.k_mode}" if cell.k_mode is not None else f"{cell.k_mean:.2f}"


def _same(cell: Cell) -> str:
    return "n/a" if cell.same_as_reference is None else f"{cell.same_as_reference * 100:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _cpu_details(machine: dict) -> str:
    """The CPU's family, model and vector extensions for the machine line, as in
    ' (family 25, model 1; AVX2; torch kernels: AVX2)'; empty where the run did not record them."""
    parts = []
    if machine.get("cpu_family"):
        parts.append(f"family {machine['cpu_family']}, model {machine.get('cpu_model', '?')}")
    if "cpu_vector" in machine:
        parts.append(", ".join(flag.upper() for flag in machine["cpu_vector"]) or "no AVX2")
    if machine.get("torch_cpu_capability"):
        parts.append(f"torch kernels: {machine['torch_cpu_capability']}")
    return f" ({'; '.join(parts)})" if parts else ""


def render(results: BenchResults) -> str:
    m, s = results.machine, results.setup
    lines = [
        "# specd benchmark",
        "",
        f"- date: {m['date']}; run took {results.duration_seconds / 60:.1f} min ("
        + ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in results.section_seconds.items())
        + " min)",
        f"- machine: {m['cpu']}{_cpu_details(m)}, {m['cores']} cores; torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}",
        f"- load average (1/5/15 min) at start {_load(m.get('load_average_at_start'))}, "
        f"at end {_load(m.get('load_average_at_end'))} (other work on the machine shows up here)",
        f"- oracle: {s['oracle']} (weights plan {s.get('oracle_weights', 'auto')}); draft: {s['draft']}",
        "- workers' resident memory at the end, idle (peak during the run): "
        + (", ".join(f"{role} {now:.0f} MB ({peak:.0f})" for role, (now, peak) in results.memory_mb.items()) or "not read"),
        f"- {s['max_tokens']} output tokens at most per request (stops at EOS); prompts per category "
        f"({', '.join(s['categories'])}): {s['prompts_per_category']} at temperature 0, "
        f"{s['sampled_prompts_per_category']} at temperature {s['sampled_temperature']:g}, "
        f"{s['rtt_prompts_per_category']} per injected round trip; torch threads per process: {s['torch_threads']}; "
        f"seed {s['seed']}",
        "- the oracle and the draft are separate worker processes (gRPC on loopback); the coordinator and the "
        "clients run in the benchmark process; the transformers baselines run in the benchmark process too, "
        "while the workers are idle",
    ]
    if s.get("quick"):
        lines.append("- **quick mode**: tiny random models, a few tokens; the figures only show that every path works")
    if s.get("note"):
        lines.append(f"- sizes: {s['note']}")
    lines += ["", "## Goals (temperature 0)", ""]
    lines += _table(
        ["goal", "measured", "result"],
        [[g.goal, g.measured, "n/a" if g.passed is None else ("PASS" if g.passed else "FAIL")] for g in results.goals],
    )
    if results.speed:
        lines += _speed(results.speed, s)
        lines += _llama_cpp(results)
        lines += _time_breakdown(results.speed)
    if results.sampled:
        lines += _speed(results.sampled, s)
    if results.rtt:
        lines += _rtt(results)
    if results.concurrency:
        lines += _concurrency(results)
    lines += ["## Plots", ""]
    lines += [f"- [{name}]({name}): {what}" for name, what in PLOTS.items()]
    lines += ["", *_definitions(s)]
    return "\n".join(lines) + "\n"


def _llama_cpp(results: BenchResults) -> list[str]:
    llama = results.llama_cpp
    if llama is None:
        return []
    lines = [
        "## llama.cpp on the same GGUF file (one stream)",
        "",
        f"`{llama.binary}` (build {llama.build}), {llama.threads} threads, `llama-bench -pg P,N`: each measured "
        f"prompt's request ({len(llama.requests)} prompts, {llama.mean_prompt_tokens:.0f} tokens on average, N the "
        "tokens specd's oracle alone wrote), run right after specd's configurations ran that prompt in each pass "
        "and once more after specd's stack stopped; per prompt the fastest of those runs counts, as for specd's "
        f"rows: {llama.tokens_per_second:.1f} tok/s over the requests' whole time, prompt included.",
        "",
    ]
    speed = results.speed
    rows = []
    for key in (ORACLE_ALONE, ADAPTIVE):
        config = speed.config(key) if speed else None
        if config is not None:
            tps = config.overall.tokens_per_second
            rows.append([config.label, f"{tps:.1f}", f"{tps / llama.tokens_per_second:.2f}x"])
    rows.append(["llama.cpp (llama-bench)", f"{llama.tokens_per_second:.1f}", "1.00x"])
    return lines + _table(["", "tok/s (all categories)", "vs llama.cpp"], rows) + [""]


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


def _speed(speed: SpeedResult, setup: dict) -> list[str]:
    categories = list(setup["categories"])
    title = "temperature 0 (greedy)" if speed.temperature == 0 else f"temperature {speed.temperature:g} (seeded)"
    lines = [f"## One client, {title}", "", f"Warm-up: {speed.warmup}.", ""]
    if speed.passes > 1:
        lines[-1:-1] = [
            f"Passes: every configuration ran every prompt {speed.passes} times, in {speed.passes} passes over the "
            "prompts; per configuration and prompt the fastest run counts (other work on the machine only adds time).",
            "",
        ]
    lines += [
        "Tokens per second (ratio to the oracle alone through specd, k=0, in the same category):",
        "",
    ]
    rows = []
    for c in speed.configs:
        cells = [c.by_category.get(cat) for cat in categories] + [c.overall]
        rows.append([c.label] + [f"{x.tokens_per_second:.1f} ({_ratio(x.ratio)})" if x else "n/a" for x in cells])
    lines += _table(["configuration", *categories, "all"], rows)
    lines += ["Speculation per configuration, all categories (k: mean / mode of the depth chosen per round):", ""]
    header = ["configuration", "tokens", "seconds", "acceptance rate", "mean acceptance length", "k"]
    if speed.temperature == 0:
        header.append("same tokens as transformers greedy")
    rows = []
    for c in speed.configs:
        o = c.overall
        row = [c.label, str(o.tokens), f"{o.seconds:.1f}", _num(o.acceptance_rate, 3), _num(o.mean_acceptance_length, 2), _k(o)]
        if speed.temperature == 0:
            row.append(_same(o))
        rows.append(row)
    lines += _table(header, rows)
    lines += ["Per category:", ""]
    rows = []
    for cat in categories:
        for c in speed.configs:
            x = c.by_category.get(cat)
            if x is None:
                continue
            rows.append([cat, c.label, f"{x.tokens_per_second:.1f}", _ratio(x.ratio), _num(x.acceptance_rate, 3),
                         _num(x.mean_acceptance_length, 2), _k(x)])
    lines += _table(["category", "configuration", "tok/s", "ratio", "acceptance rate", "mean acceptance length", "k"], rows)
    if speed.best_fixed:
        lines += ["Best fixed k (0..8) per category, and adaptive against it:", ""]
        lines += _table(
            ["category", "best fixed k", "its tok/s", "adaptive tok/s", "adaptive / best"],
            [[b.category, str(b.k), f"{b.tokens_per_second:.1f}", f"{b.adaptive_tokens_per_second:.1f}",
              _ratio(b.adaptive_over_best)] for b in speed.best_fixed],
        )
    return lines


def _ms(seconds: float, count: int) -> str:
    return f"{seconds / count * 1000:.1f}" if count else "n/a"


def _time_breakdown(speed: SpeedResult) -> list[str]:
    """Per round, where a specd request's time goes (temperature 0, all categories)."""
    rows = []
    configs = [c for c in speed.configs if c.engine == "specd"]
    for c in configs:
        o = c.overall
        if not o.rounds:
            continue
        overhead = max(0.0, o.loop_seconds - o.draft_seconds - o.verify_seconds - o.network_seconds)
        outside = max(0.0, o.seconds - o.loop_seconds)
        compute = o.draft_seconds + o.verify_seconds
        ideal = o.tokens / (compute + outside) if compute + outside > 0 else None
        rows.append([
            c.label,
            f"{o.tokens / o.rounds:.2f}",
            _ms(o.verify_seconds, o.rounds),
            _ms(o.draft_seconds, o.rounds),
            _ms(o.draft_seconds, o.drafted),
            _ms(o.network_seconds, o.rounds),
            _ms(overhead, o.rounds),
            _ms(outside, o.requests),
            f"{o.tokens_per_second:.1f}",
            _num(ideal),
        ])
    lines = [
        "## Where the time goes (temperature 0, all categories)",
        "",
        "Per round: the oracle's verify compute, the draft's compute (and per draft token), the two worker RPCs' "
        "wall time beyond compute (gRPC, serialization, queueing), and the session loop's own time in the "
        "coordinator (Python). Per request: time outside the round loop (opening both sessions with the prompt "
        "prefill, Ray acquire/release, the client call). The last column removes the per-round RPC and "
        "coordinator overhead: what the same rounds would give with free communication.",
        "",
    ]
    lines += _table(
        ["configuration", "tokens / round", "verify ms", "draft ms", "draft ms / token", "RPC ms", "coordinator ms",
         "outside rounds ms / request", "tok/s", "tok/s without RPC + coordinator"],
        rows,
    )
    alone = speed.config(ORACLE_ALONE)
    draft_token = [c.overall.draft_seconds / c.overall.drafted for c in configs if c.overall.drafted]
    if alone and alone.overall.rounds and draft_token:
        step = alone.overall.verify_seconds / alone.overall.rounds
        c_ratio = min(draft_token) / step if step > 0 else float("nan")
        lines += [
            f"One oracle step (verify at k=0) takes {step * 1000:.1f} ms of compute; one draft token "
            f"{min(draft_token) * 1000:.1f} ms, so c = draft token / oracle step = {c_ratio:.3f}. Speculation "
            "gains only while the acceptance rate stays well above c and the per-round overhead stays small "
            "next to one oracle step.",
            "",
        ]
    return lines


def _rtt(results: BenchResults) -> list[str]:
    rtt = results.rtt
    assert rtt is not None
    categories = list(results.setup["categories"])
    lines = [
        "## Injected round trip between the coordinator and the oracle (temperature 0, one client)",
        "",
        f"Every Verify call waits the given time first (coordinator oracle_delay_ms); {rtt.prompts_per_category} "
        f"prompt(s) per category; a fresh coordinator per delay. {rtt.warmup}.",
        "",
    ]
    rows = []
    for p in rtt.points:
        a, b = p.adaptive.overall, p.oracle_alone.overall
        rows.append([f"{p.delay_ms:g}", f"{b.tokens_per_second:.1f}", f"{a.tokens_per_second:.1f}", _ratio(p.ratio_overall), _k(a),
                     _num(a.acceptance_rate, 3)] + [_ratio(p.ratio_by_category.get(c)) for c in categories])
    lines += _table(
        ["RTT ms", "oracle alone tok/s", "adaptive tok/s", "ratio", "adaptive k (mean / mode)", "acceptance rate",
         *[f"ratio {c}" for c in categories]],
        rows,
    )
    return lines


def _concurrency(results: BenchResults) -> list[str]:
    conc = results.concurrency
    assert conc is not None
    lines = [
        "## Concurrent clients (temperature 0, streaming)",
        "",
        f"Each client has its own {'HTTP connection (the OpenAI-compatible API, server-sent events)' if results.setup.get('concurrency_api') == 'http' else 'gRPC channel'} "
        "and streams its requests one after another; requests per level: "
        + ", ".join(f"{n} clients: {r}" for n, r in results.setup["concurrency_requests"].items())
        + f". Failed requests are counted apart and left out of the latencies. {conc.warmup}. The "
        "transformers static batch row is the plain library's `generate` over as many prompts at once, each writing "
        "the full token count, in this process while the workers idle (its end-to-end time is the batch's).",
        "",
    ]
    rows = []
    for p in conc.points:
        x = p.summary
        rows.append([p.policy, str(p.clients), str(x.requests), str(x.failed), f"{x.tokens_per_second:.1f}",
                     _num(x.ttft_p50_ms), _num(x.ttft_p99_ms), _num(x.itl_p50_ms), _num(x.itl_p99_ms),
                     _num(x.tpot_p50_ms), _num(x.e2e_p50_ms, 0), _num(x.k_mean, 2)])
    lines += _table(
        ["policy", "clients", "requests", "failed", "aggregate tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
         "ITL p99 ms", "TPOT p50 ms", "end-to-end p50 ms", "mean k"],
        rows,
    )
    errors = sorted({e for p in conc.points for e in p.summary.errors})
    if errors:
        lines += ["Errors seen: " + "; ".join(errors), ""]
    return lines


def _definitions(setup: dict) -> list[str]:
    hf = setup.get("transformers_assisted") or {}
    lines = [
        "## Definitions",
        "",
        "- tokens per second: output tokens (counted by the benchmark from the returned token ids, EOS excluded) "
        "divided by the requests' wall time as the client sees it, summed over the requests of a cell.",
        "- acceptance rate = accepted / drafted draft tokens; mean acceptance length = 1 + accepted / rounds that "
        "drafted (tokens committed per round, the oracle's own token included).",
        "- k: draft tokens asked for in a round (k=0: the oracle decodes alone); mean and mode over all rounds.",
        "- TTFT: request sent to the first message with tokens. ITL: a message with n tokens arriving `gap` after "
        "the previous one counts n latencies of gap / n (accepted tokens arrive in bursts). TPOT = (end-to-end - "
        "TTFT) / (tokens - 1). p50/p99 over all requests of a level.",
        "- configurations take turns prompt by prompt, so background load affects them alike; ratios within one "
        "run are the figures to compare.",
    ]
    if hf:
        lines.append(
            f"- transformers assisted generation: assistant {hf.get('assistant')}; num_assistant_tokens "
            f"{hf.get('num_assistant_tokens')}, schedule {hf.get('num_assistant_tokens_schedule')}, confidence "
            f"threshold {hf.get('assistant_confidence_threshold')} (transformers' defaults); its acceptance figures come "
            "from counting the two models' forward calls. transformers can only run a draft that reads tokens alone, "
            "so when specd's draft reads the oracle's features, the assistant is the best standalone draft shipped."
        )
    return lines + [""]


def write_markdown(results: BenchResults, path: Path) -> None:
    path.write_text(render(results))

