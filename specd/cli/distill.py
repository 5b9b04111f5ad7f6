"""`specd distill`: its command line (the stages are specd.training.pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from specd.core.defaults import EMBEDDED_ORACLE
from specd.training.pipeline import run
from specd.training.prompts import DEFAULT_PROMPTS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "distill",
        help="train a small draft for an oracle (offline; CPU or CUDA)",
        description="Distil a draft from an oracle: its first layers retrained on KL(oracle || draft) "
        "over the oracle's own answers. Writes a draft artifact directory the draft service loads by path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--oracle", default=EMBEDDED_ORACLE, help="the oracle's model source")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory (work files go to OUT/work)")
    parser.add_argument(
        "--kind", choices=["layers", "features"], default="layers",
        help="layers: the oracle's first --layers layers, reading tokens alone; features: one layer reading the "
        "oracle's final hidden states, which the oracle returns with each verdict (llama-style oracles)",
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers the draft keeps from the oracle")
    parser.add_argument(
        "--unroll", type=int, default=2,
        help="features: training passes; pass n reads the draft's own features from n - 1 steps before, as the "
        "n-th token of a block does (1: real features only)",
    )
    parser.add_argument(
        "--recipe", choices=["eagle", "eagle3"], default="eagle3",
        help="features: eagle3 reads a low, a middle and the final hidden state of the oracle and trains each "
        "unrolled step as serving attends (training-time test); eagle reads the final state alone "
        "(specd.training.features)",
    )
    parser.add_argument(
        "--feature-layers", default="",
        help="features: the oracle hidden states the draft reads, comma-separated (0: the embeddings, N: the final "
        "state of an N-layer oracle); empty: the recipe's",
    )
    parser.add_argument(
        "--feature-regression", type=float, default=1.0,
        help="features, eagle3: weight of a regression of each step's predicted feature onto the oracle's next "
        "final state, beside the KL (0: the KL alone, as EAGLE-3 trains; eagle always regresses, with weight 1)",
    )
    parser.add_argument("--head-vocab", type=int, default=0, help="tokens the draft's output head scores (0: all)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL prompt set")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of prompts kept for evaluation only")
    parser.add_argument("--answers-per-prompt", type=int, default=1, help="sampled oracle answers per training prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest oracle answer")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the oracle's answers")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of the oracle's answers")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="prompts per batched oracle generate")
    parser.add_argument("--targets", type=int, default=64, help="top-K tokens of the oracle kept per answer position")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget in minutes (0: none)")
    parser.add_argument(
        "--steps", type=int, default=0, help="training steps (0: no limit); training ends at --steps or --minutes"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="answers per training step")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the oracle's sampling and the data order")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue from the checkpoint in OUT/work (the oracle's cached answers are reused either way)",
    )
    parser.add_argument("--eval-prompts", type=int, default=64, help="most held-out prompts used to measure acceptance")
    parser.add_argument("--eval-tokens", type=int, default=96, help="tokens generated per held-out prompt")
    parser.add_argument("--k", type=int, default=4, help="draft depth for the acceptance measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--device", default="cpu",
        help="where the oracle answers, records its features and the draft trains and is measured: cpu, cuda, "
        "cuda:N (the artifact is the same kind either way; its ms figures are that device's)",
    )
    parser.set_defaults(func=run)
    return parser
