"""`specd quality`: how far each weights plan's oracle departs from the float32 one.

    specd quality [--oracle SOURCE] [--weights float16,int4] [--max-tokens 48] [--out results/quality]

Speculation is exact against the oracle a worker serves, whatever its weights plan
(specd.kernels.weights); which oracle that is, is a question of quality, measured here against the
float32 plan on the same model:
- perplexity on a small text set shipped with the package (specd/data/quality_text.txt: prose,
  instructions, a letter, a little code, a worked answer), in windows of at most WINDOW tokens;
- greedy agreement over the benchmark's held-out prompts (specd/data/bench_prompts.jsonl):
  teacher-forced, the share of positions of the float32 oracle's greedy continuation where the
  plan's top token is the same; free-running, how many of the plan's own greedy tokens match
  the float32 ones before the first difference, and how many prompts match all the way.
A plan holds the quality bar when its perplexity is within PERPLEXITY_BAR of float32's and its
teacher-forced agreement is at least AGREEMENT_BAR (docs/weights.md has the figures).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from specd.core.defaults import EMBEDDED_ORACLE

TEXT_PATH = Path(__file__).resolve().parent.parent / "data" / "quality_text.txt"
WINDOW = 512
PERPLEXITY_BAR = 0.01  # at most 1% above float32's perplexity
AGREEMENT_BAR = 0.98  # at least 98% of teacher-forced positions with float32's top token
REFERENCE = "float32"


@dataclass
class PlanQuality:
    plan: str
    kernels: dict[str, int]  # linear layers per kernel
    perplexity: float
    perplexity_change: float  # relative to float32's
    teacher_forced_agreement: float  # share of positions
    greedy_prefix: float  # mean share of the tokens matching float32's before the first difference
    greedy_identical: int  # prompts whose whole greedy continuation matches
    prompts: int
    holds_bar: bool


def _perplexity(model, ids: list[int]) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, WINDOW):
            window = torch.tensor([ids[start : start + WINDOW + 1]])
            logits = model(window[:, :-1]).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(nll / count)


def _greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    import torch
    from transformers import DynamicCache

    cache, out = DynamicCache(), []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        for _ in range(max_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
    return out


def _teacher_forced(model, prompt: list[int], continuation: list[int]) -> list[int]:
    """The model's top token at each position of `continuation` given the tokens before it."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([prompt + continuation[:-1]])).logits[0]
    return logits[len(prompt) - 1 :].argmax(-1).tolist()


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(
    oracle: str = EMBEDDED_ORACLE, plans: tuple[str, ...] = ("float16", "int4"), max_tokens: int = 48,
    prompts_per_category: int = 2, threads: int = 0, text_path: Path = TEXT_PATH,
) -> list[PlanQuality]:
    """The quality of each plan against float32 (module docstring); float32's own row first."""
    from specd.bench.prompts import load_prompt_set
    from specd.bench.runner import tokenize
    from specd.kernels.weights import weights_kernels
    from specd.runtime.loading import load_worker_model
    from specd.runtime.model_spec import ModelSpec

    reference_ids: list[list[int]] = []
    prompt_ids: list[list[int]] = []
    rows: list[PlanQuality] = []
    base_perplexity = 0.0
    for plan in (REFERENCE, *[p for p in plans if p != REFERENCE]):
        loaded = load_worker_model(ModelSpec(source=oracle, weights=plan, torch_threads=threads))
        model, tokenizer = loaded.model, loaded.tokenizer
        if not prompt_ids:
            prompt_set = load_prompt_set(prompts_per_category)
            encoded = tokenize(loaded, prompt_set)
            prompt_ids = [encoded[p.id] for p in prompt_set.measured]
        perplexity = _perplexity(model, tokenizer(text_path.read_text())["input_ids"])
        greedy = [_greedy(model, ids, max_tokens) for ids in prompt_ids]
        if plan == REFERENCE:
            reference_ids, base_perplexity = greedy, perplexity
            agreement = 1.0
        else:
            same = total = 0
            for ids, reference in zip(prompt_ids, reference_ids):
                top = _teacher_forced(model, ids, reference)
                same += sum(a == b for a, b in zip(top, reference))
                total += len(reference)
            agreement = same / max(total, 1)
        prefixes = [_prefix(g, r) / max(len(r), 1) for g, r in zip(greedy, reference_ids)]
        change = perplexity / base_perplexity - 1
        rows.append(PlanQuality(
            plan=plan, kernels={k: n for k, n in weights_kernels(model).items() if n},
            perplexity=perplexity, perplexity_change=change, teacher_forced_agreement=agreement,
            greedy_prefix=sum(prefixes) / len(prefixes), greedy_identical=sum(g == r for g, r in zip(greedy, reference_ids)),
            prompts=len(prompt_ids), holds_bar=change <= PERPLEXITY_BAR and agreement >= AGREEMENT_BAR,
        ))
        del model, loaded
    return rows


def table(rows: list[PlanQuality]) -> str:
    lines = [
        "| weights | linear layers | perplexity | vs float32 | teacher-forced agreement | greedy tokens before a difference | "
        "identical continuations | quality bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernels = ", ".join(f"{k} {n}" for k, n in r.kernels.items())
        bar = "reference" if r.plan == REFERENCE else ("holds" if r.holds_bar else "fails")
        lines.append(
            f"| {r.plan} | {kernels} | {r.perplexity:.3f} | {100 * r.perplexity_change:+.2f}% | "
            f"{100 * r.teacher_forced_agreement:.1f}% | {100 * r.greedy_prefix:.0f}% | {r.greedy_identical}/{r.prompts} | {bar} |"
        )
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("quality", help="how far each weights plan's oracle departs from the float32 one")
    parser.add_argument("--oracle", default=EMBEDDED_ORACLE, help=f"oracle model source (default: {EMBEDDED_ORACLE})")
    parser.add_argument("--weights", default="float16,int4", help="comma-separated plans to compare with float32")
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per prompt (default 48)")
    parser.add_argument("--prompts-per-category", type=int, default=2, help="held-out prompts per category (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write quality.json and quality.md here")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    plans = tuple(p.strip() for p in args.weights.split(",") if p.strip())
    rows = measure(args.oracle, plans, args.max_tokens, args.prompts_per_category, args.threads)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
        (args.out / "quality.md").write_text(text + "\n")
    return 0
