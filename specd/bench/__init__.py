"""`specd bench`: the benchmark that measures what speculation buys, in one run.

    specd bench [--out results/latest] [--quick] [--sections speed,sampled,rtt,concurrency]

On the default pair (or --oracle/--draft), over the shipped prompt set (chat, code, extraction,
creative), it measures with one client the oracle alone through specd (k=0), plain transformers
`generate`, transformers assisted generation (its assistant: the draft, or the shipped standalone
draft when the draft reads the oracle's features), specd with fixed k = 1..8 and
with the adaptive policy, at temperature 0 and at a seeded temperature; then an injected round
trip to the oracle (0, 2, 10, 50 ms) and 1 to 32 concurrent streaming clients, beside transformers'
static batch of each size. It writes
results.json, results.md (tables, the goals with PASS/FAIL) and PNG plots into --out.

The workers run as separate processes; the coordinator and the clients run in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path

from specd.core.defaults import EMBEDDED_ORACLE

FULL_MAX_TOKENS = 48
FULL_PROMPTS_PER_CATEGORY = 2
FULL_PASSES = 2
FULL_DELAYS = "0,2,10,50"
QUICK_MAX_TOKENS = 8
QUICK_DELAYS = "0,50"
FULL_CLIENTS = "1,2,4,8,16,32"
QUICK_CLIENTS = "1,4,8"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/latest"), help="results folder (default: results/latest)")
    parser.add_argument("--quick", action="store_true", help="tiny random models and a few tokens: checks every path in well under a minute")
    parser.add_argument("--oracle", default=None, help=f"oracle model source (default: {EMBEDDED_ORACLE}; --quick: a tiny model)")
    parser.add_argument("--draft", default=None, help="draft model source (default: the default draft for the oracle)")
    parser.add_argument("--draft-layers", type=int, default=None, help="keep the draft's first N layers (0 keeps all)")
    parser.add_argument(
        "--assistant", default=None,
        help="assistant model of transformers' assisted generation (default: the draft; for a draft that reads "
        "the oracle's features, which transformers cannot run, the shipped standalone draft)",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help=f"output tokens per request (default {FULL_MAX_TOKENS}; --quick {QUICK_MAX_TOKENS})")
    parser.add_argument("--prompts-per-category", type=int, default=None, help=f"measured prompts per category (default {FULL_PROMPTS_PER_CATEGORY}; --quick 1)")
    parser.add_argument(
        "--passes", type=int, default=None,
        help=f"passes of the greedy section over its prompts; per configuration and prompt the fastest run counts "
        f"(default {FULL_PASSES}; --quick 1)",
    )
    parser.add_argument("--sampled-prompts-per-category", type=int, default=1, help="prompts per category at the sampled temperature")
    parser.add_argument("--rtt-prompts-per-category", type=int, default=1, help="prompts per category in the round-trip section")
    parser.add_argument("--sections", default="speed,sampled,rtt,concurrency", help="comma-separated subset of speed,sampled,rtt,concurrency")
    parser.add_argument("--seed", type=int, default=0, help="base seed of sampled requests (prompt i uses seed + i)")
    parser.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled section")
    parser.add_argument("--delays", default=None, help=f"injected coordinator-oracle round trips, ms (default {FULL_DELAYS}; --quick {QUICK_DELAYS})")
    parser.add_argument("--clients", default=None, help=f"concurrency levels (default {FULL_CLIENTS}; --quick {QUICK_CLIENTS})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all cores; --quick 1)")
    parser.add_argument("--prompts", type=Path, default=None, help="prompt set (JSONL; default: the shipped one)")
    parser.add_argument(
        "--weights", choices=("auto", "float32", "float16", "int4"), default="auto",
        help="the oracle worker's weights plan (specd serve oracle --weights; default auto)",
    )
    parser.add_argument(
        "--llama-cpp", type=Path, default=None, metavar="PATH",
        help="a llama-bench binary: adds llama.cpp on the oracle's GGUF file to the one-client section, each measured "
        "prompt's request (its length, the tokens specd's oracle alone wrote, the same threads) right after specd's, "
        "and its goals (docs/weights.md says how to build one)",
    )
    parser.add_argument(
        "--api", choices=("grpc", "http"), default="grpc",
        help="how the concurrency section's clients reach specd: its gRPC API, or the OpenAI-compatible HTTP API "
        "(/v1/completions with server-sent events, as vLLM's serving benchmark drives a server)",
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmark specd against the oracle alone and transformers")
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _numbers(text: str, kind: type) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated numbers, got {text!r}") from None


def build_options(args: argparse.Namespace, workdir: Path | None = None):
    """BenchOptions from the command line; --quick writes tiny models under `workdir`."""
    from specd.bench.runner import SECTIONS, BenchOptions
    from specd.models.shipped import default_draft_source, is_feature_draft, standalone_draft_source

    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        raise SystemExit(f"--sections takes a comma-separated subset of {','.join(SECTIONS)}; got {args.sections!r}")
    oracle, draft, draft_layers = args.oracle, args.draft, args.draft_layers
    if args.quick and oracle is None:
        from specd.models.tiny import write_tiny_model

        assert workdir is not None
        oracle = str(write_tiny_model(workdir / "oracle", seed=1, layers=4, hidden=64, max_context=4096))
        if draft is None:
            draft, draft_layers = oracle, 1 if draft_layers is None else draft_layers
    oracle = oracle or EMBEDDED_ORACLE
    if draft is None:
        draft, default_layers = default_draft_source() if oracle == EMBEDDED_ORACLE else (oracle, 1)
        draft_layers = default_layers if draft_layers is None else draft_layers
    assistant, assistant_layers = args.assistant or "", 0
    if not assistant and is_feature_draft(draft):
        if oracle != EMBEDDED_ORACLE:
            raise SystemExit("--draft reads the oracle's features, which transformers cannot run: give --assistant")
        assistant, assistant_layers = standalone_draft_source()
    quick = args.quick
    if args.llama_cpp is not None and not args.llama_cpp.is_file():
        raise SystemExit(f"--llama-cpp: no file at {args.llama_cpp}")
    if args.passes is not None and args.passes < 1:
        raise SystemExit(f"--passes must be at least 1, got {args.passes}")
    max_tokens = args.max_tokens or (QUICK_MAX_TOKENS if quick else FULL_MAX_TOKENS)
    per_category = args.prompts_per_category or (1 if quick else FULL_PROMPTS_PER_CATEGORY)
    defaults = args.max_tokens is None and args.prompts_per_category is None and args.passes is None
    note = "" if quick or not defaults else (
        "the default sizes, chosen so that the whole run takes about 15-20 minutes on a 2-core CPU"
    )
    return BenchOptions(
        out=args.out,
        oracle=oracle,
        draft=draft,
        draft_layers=draft_layers or 0,
        max_tokens=max_tokens,
        prompts_per_category=per_category,
        sampled_prompts_per_category=min(args.sampled_prompts_per_category, per_category),
        rtt_prompts_per_category=min(args.rtt_prompts_per_category, per_category),
        sections=sections,
        api=args.api,
        seed=args.seed,
        temperature=args.temperature,
        delays_ms=_numbers(args.delays or (QUICK_DELAYS if quick else FULL_DELAYS), float),
        clients=_numbers(args.clients or (QUICK_CLIENTS if quick else FULL_CLIENTS), int),
        min_requests_per_level=1 if quick else 4,
        requests_per_client=1,
        # Tiny models gain nothing from intra-op threads; they only add synchronisation.
        threads=args.threads or (1 if quick else os.cpu_count() or 1),
        quick=quick,
        passes=args.passes or (1 if quick else FULL_PASSES),
        note=note,
        assistant=assistant,
        assistant_layers=assistant_layers,
        weights=args.weights,
        llama_cpp=args.llama_cpp,
        **({"prompts_path": args.prompts} if args.prompts else {}),
    )


async def _run(options):
    from specd.bench.runner import run_bench

    return await run_bench(options)


def run(args: argparse.Namespace) -> int:
    # A Ray call made after the benchmark shut its Ray down must fail, not start another cluster.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from specd.bench.plots import write_plots
    from specd.bench.report import write_markdown
    from specd.bench.results import write_json

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="specd-bench-"))) if args.quick else None
        options = build_options(args, workdir)
        try:
            results = asyncio.run(_run(options))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("\nspecd bench: interrupted; the workers, coordinators and Ray it started were stopped", file=sys.stderr)
            return 130
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    write_markdown(results, out / "results.md")
    write_plots(results, out)
    print(f"\nspecd bench: {results.duration_seconds / 60:.1f} min; results in {out}/ (results.md, results.json, *.png)")
    for goal in results.goals:
        verdict = "n/a " if goal.passed is None else ("PASS" if goal.passed else "FAIL")
        print(f"  {verdict}  {goal.goal}: {goal.measured}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specd bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
