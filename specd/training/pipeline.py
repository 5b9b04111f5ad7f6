"""`specd distill`: train a small draft to imitate an oracle, offline, on a CPU or a CUDA GPU.

The draft is the oracle's own embedding and output head over its first L decoder layers; the
L layers and the final norm are retrained so that the draft's next-token distribution q matches
the oracle's p. Cheap per token (L layers instead of all), and its vocabulary is the oracle's
by construction. Stages, each cached under `<out>/work/` so that a rerun resumes where it stopped:

1. answers: the oracle answers the training prompts (sampled, batched, chat template applied),
   recording its top-K next-token distribution at every answer position (temperature 1). On a
   CPU the oracle runs through oneDNN layers (specd.kernels.cpu_linear), as in a worker.
2. head: with --head-vocab N the draft's output head keeps only the N tokens the oracle emits
   most often in its answers (plus eos), which makes each draft token cheaper.
3. training: KL(p || q), teacher-forced on prompt + answer, loss on the answer positions;
   checkpointed every --checkpoint-every steps.
4. artifact: the retrained tensors are written as a draft artifact (specd.models.artifact), loaded
   back the way the draft service loads it, and its greedy acceptance at depth k is measured on
   held-out prompts (never trained on) against the untrained truncated draft, together with the
   time of one draft token and one oracle token. The figures go into the manifest.

--device runs every stage on that device (the oracle's answers and features, training, the
measurement); what it writes is the same either way, and the manifest records the device, whose
ms figures these are.

Acceptance rate and mean acceptance length have the meanings defined in specd.core.verification.
Greedy acceptance is replayed from the oracle's greedy continuations (`replay_acceptance`), which
gives the same counts as a live drafter/verifier loop (`greedy_acceptance`) at a fraction of the cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specd.core import validation
from specd.core.defaults import EMBEDDED_ORACLE
from specd.core.errors import InvalidArgument
from specd.kernels.cpu_linear import onednn_available, use_cpu_linear
from specd.models.artifact import DraftManifest, save_draft_artifact, slice_output_head
from specd.models.feature_draft import FeatureDraftModel
from specd.models.loader import load_model
from specd.models.pretrained import LoadedModel, check_device
from specd.models.sources import resolve_source
from specd.training.answers import AnswerSettings, OracleAnswer, answering_seconds, oracle_answers
from specd.training.dataset import TrainingSet, choose_head_vocab
from specd.training.evaluation import (
    AcceptanceReport,
    greedy_acceptance,
    greedy_continuations,
    ms_per_token,
    replay_acceptance,
    token_agreement,
)
from specd.training.features import (
    first_token_agreement,
    oracle_features,
    recipe_layers,
    step_ms,
    train_feature_draft,
)
from specd.training.prompts import Prompt, encode_prompt, load_prompts, split_held_out
from specd.training.trainer import TrainResult, TrainSettings, train_draft

WORK_DIR = "work"  # under --out: cached answers, checkpoint, greedy continuations (not part of the artifact)


def _portable_source(source: str) -> str:
    """The oracle source to record in the manifest: local paths made absolute, names kept."""
    _, path = resolve_source(source)
    return str(path.resolve()) if path is not None and source != EMBEDDED_ORACLE else source


@dataclass
class Corpus:
    """Stage 1's output: the prompts on each side of the split and the oracle's answers to the training ones."""

    settings: AnswerSettings
    train_prompts: list[Prompt]
    held_out: list[Prompt]
    answers: list[OracleAnswer]
    max_prompt: int  # prompt tokens kept, leaving room for the longest answer


@dataclass
class Trained:
    model: torch.nn.Module
    result: TrainResult
    layers: int
    answer_tokens: int
    answers: int


def run(args: argparse.Namespace) -> int:
    """`specd distill`: answers, head, training, artifact, measurement (the stages above)."""
    device = _check(args)
    out: Path = args.out
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    oracle = _load_oracle(args, device)
    corpus = _answer(args, oracle, work)
    head_ids = None
    if args.head_vocab:
        head_ids = choose_head_vocab(corpus.answers, args.head_vocab, oracle.eos_token_ids, oracle.vocab_size)
    trained = _train(args, oracle, corpus, head_ids, device, work)
    manifest = _manifest(args, oracle, corpus, head_ids, trained, device)
    save_draft_artifact(out, trained.model, manifest)
    result = trained.result
    del trained
    figures = _measure(args, oracle, corpus, head_ids, device, work)
    figures["this_run_minutes"] = round((time.perf_counter() - started) / 60, 2)
    manifest.training.update(figures)
    manifest.write(out)
    _report(args, out, result, figures)
    return 0


def _check(args: argparse.Namespace) -> torch.device:
    """Refuse bad settings before any work; returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    if args.layers < 1:
        raise InvalidArgument("--layers must be at least 1")
    if args.unroll < 1:
        raise InvalidArgument("--unroll must be at least 1")
    try:
        args.feature_layers = tuple(int(i) for i in str(args.feature_layers or "").split(",") if i.strip())
    except ValueError as exc:
        raise InvalidArgument(f"--feature-layers takes comma-separated layer numbers: {exc}") from exc
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise InvalidArgument("the oracle's answers are sampled: --temperature must be > 0 and --top-p in (0, 1]")
    return device


def _load_oracle(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    oracle = load_model(args.oracle, device=str(device))
    if oracle.device.type == "cpu" and onednn_available():
        # The oracle only runs inference here (its answers, its features, the held-out measurement), so it
        # multiplies as a worker does.
        use_cpu_linear(oracle.model, "onednn")
    return oracle


def _answer(args: argparse.Namespace, oracle: LoadedModel, work: Path) -> Corpus:
    """Stage 1: the split, and the oracle's answers to the training prompts (cached under work/answers)."""
    train_prompts, held_out = split_held_out(load_prompts(args.prompts), args.held_out)
    max_prompt = max(16, oracle.max_context - args.max_new_tokens - 1)
    settings = AnswerSettings(
        oracle=_portable_source(args.oracle),
        prompts_sha256=hashlib.sha256(json.dumps([p.key for p in train_prompts]).encode()).hexdigest(),
        held_out=args.held_out,
        answers_per_prompt=args.answers_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.gen_batch_size,
        targets=args.targets,
        seed=args.seed,
    )
    train_ids = [encode_prompt(oracle, p, max_prompt) for p in train_prompts]
    answers = oracle_answers(oracle, train_ids, work / "answers", settings)
    return Corpus(settings, train_prompts, held_out, answers, max_prompt)


def _train(
    args: argparse.Namespace, oracle: LoadedModel, corpus: Corpus, head_ids: list[int] | None, device: torch.device,
    work: Path,
) -> Trained:
    """Stage 3: train the draft of the kind asked for, resuming from work/checkpoint.pt when it fits."""
    train_settings = TrainSettings(
        steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
    )
    identity = {
        "answers": hashlib.sha256(json.dumps(asdict(corpus.settings), sort_keys=True).encode()).hexdigest(),
        "kind": args.kind,
        "layers": args.layers,
        "head": hashlib.sha256(json.dumps(head_ids).encode()).hexdigest(),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    head = len(head_ids) if head_ids else oracle.vocab_size
    sides = f"{len(corpus.train_prompts)} prompts ({len(corpus.held_out)} held out); head: {head} tokens"
    if args.kind == "features":
        layers, head_norm = _feature_shape(args, oracle)
        identity.update(
            unroll=args.unroll, recipe=args.recipe, feature_layers=list(layers), head_norm=head_norm,
            feature_regression=args.feature_regression,
        )
        features = oracle_features(
            oracle, corpus.answers, work / ("features" + "".join(f"-{i}" for i in layers)), head_token_ids=head_ids,
            targets=args.targets, batch_size=args.gen_batch_size // 4 or 1, layers=layers,
        )
        model = FeatureDraftModel(oracle.model, head_ids, layers, head_norm).to(device)
        read = f"hidden states {', '.join(map(str, layers))}" if layers else "the final hidden state"
        tqdm.write(f"training a feature draft ({args.recipe}: {read}) on {features.answer_tokens} answer tokens from {sides}")
        result = train_feature_draft(
            model, features, work / "checkpoint.pt", identity, train_settings, passes=args.unroll, recipe=args.recipe,
            regression=args.feature_regression,
        )
        return Trained(model, result, 1, features.answer_tokens, len(features))
    draft = load_model(args.oracle, layers=args.layers, device=str(device))
    if head_ids is not None:
        slice_output_head(draft.model, head_ids)
    data = TrainingSet.build(corpus.answers, head_ids, oracle.vocab_size)
    tqdm.write(f"training a {args.layers}-layer draft on {data.answer_tokens} answer tokens from {sides}")
    result = train_draft(
        draft.model, data, draft.model.get_output_embeddings().weight, work / "checkpoint.pt", identity, train_settings
    )
    return Trained(draft.model, result, args.layers, data.answer_tokens, len(data))


def _feature_shape(args: argparse.Namespace, oracle: LoadedModel) -> tuple[tuple[int, ...], bool]:
    """(the oracle hidden states a feature draft reads, whether it norms before its head), from the recipe and
    --feature-layers."""
    count = oracle.model.config.num_hidden_layers
    layers = validation.feature_layers(args.feature_layers or recipe_layers(args.recipe, count), count, True)
    if layers and args.recipe == "eagle":
        raise InvalidArgument("the eagle recipe reads the oracle's final state alone; --feature-layers needs eagle3")
    if layers and layers[-1] != count and args.feature_regression:
        raise InvalidArgument(
            f"the feature regression's target is the oracle's final state: list {count} last in --feature-layers, "
            "or set --feature-regression 0"
        )
    return layers, args.recipe == "eagle3"


def _manifest(
    args: argparse.Namespace, oracle: LoadedModel, corpus: Corpus, head_ids: list[int] | None, trained: Trained,
    device: torch.device,
) -> DraftManifest:
    result = trained.result
    model = trained.model
    shape = (
        {"feature_layers": list(model.feature_layers), "head_norm": model.norm is not None}
        if isinstance(model, FeatureDraftModel) else {}
    )
    return DraftManifest(
        **shape,
        base=_portable_source(args.oracle),
        layers=trained.layers,
        vocab_fingerprint=oracle.vocab_fingerprint,
        head_token_ids=head_ids,
        kind=args.kind,
        training={
            "seed": args.seed,
            "steps": result.steps,
            "tokens": result.tokens,
            "answer_tokens": trained.answer_tokens,
            "answers": trained.answers,
            "train_prompts": len(corpus.train_prompts),
            "held_out_prompts": len(corpus.held_out),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "final_kl": round(result.kl, 4) if math.isfinite(result.kl) else None,
            "training_minutes": round(result.seconds / 60, 2),
            "answer_settings": {
                k: v for k, v in asdict(corpus.settings).items() if k not in ("oracle", "prompts_sha256")
            },
            **({"unroll": args.unroll, "recipe": args.recipe} if args.kind == "features" else {}),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
    )


def _measure(
    args: argparse.Namespace, oracle: LoadedModel, corpus: Corpus, head_ids: list[int] | None, device: torch.device,
    work: Path,
) -> dict:
    """Stage 4: measure what ships, the artifact as the draft service loads it, on the held-out prompts."""
    shipped = load_model(str(args.out), device=str(device))
    eval_prompts = [encode_prompt(oracle, p, corpus.max_prompt) for p in corpus.held_out[: args.eval_prompts]]
    figures: dict = {"k": args.k, "eval_prompts": len(eval_prompts), "eval_tokens": args.eval_tokens}
    if eval_prompts and args.kind == "features":
        figures.update(_evaluate_feature_draft(shipped, oracle, eval_prompts, head_ids, args, work))
    elif eval_prompts:
        untrained = load_model(args.oracle, layers=args.layers, device=str(device))
        continuations = _cached_continuations(oracle, eval_prompts, args.eval_tokens + args.k, work / "greedy.json")
        replay = {
            "eos_token_ids": oracle.eos_token_ids, "k": args.k, "max_new_tokens": args.eval_tokens,
            "context": oracle.max_context,
        }
        trained = replay_acceptance(shipped, eval_prompts, continuations, **replay)
        baseline = replay_acceptance(untrained, eval_prompts, continuations, **replay)
        agreement = [token_agreement(d, eval_prompts, continuations, args.eval_tokens) for d in (shipped, untrained)]
        timing = [shipped, untrained, oracle]
        draft_ms, untrained_ms, oracle_ms = ms_per_token(timing, max(eval_prompts, key=len))
        figures.update(_figures(trained, baseline, agreement, draft_ms, oracle_ms))
        figures["full_head_draft_ms_per_token"] = round(untrained_ms, 2)
    figures["answering_minutes"] = round(answering_seconds(work / "answers") / 60, 2)
    return figures


def _report(args: argparse.Namespace, out: Path, result: TrainResult, figures: dict) -> None:
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    print(f"draft artifact: {out} ({size_mb:.1f} MB), {result.steps} steps, {result.tokens} tokens, "
          f"{result.seconds / 60:.1f} min training, final KL {result.kl:.3f}")
    if not figures["eval_prompts"]:
        return
    print(
        f"held-out greedy acceptance (k={args.k}, {figures['eval_prompts']} prompts): "
        f"{figures['held_out_acceptance']:.3f} distilled vs {figures['untrained_acceptance']:.3f} untrained; "
        f"mean acceptance length {figures['held_out_mean_acceptance_length']:.2f}; per-token agreement "
        f"{figures['held_out_token_agreement']:.3f} vs {figures['untrained_token_agreement']:.3f}"
    )
    for goal, measured, _, passed in DraftManifest.read(out).goals():
        print(f"goal: {goal}: {measured} {'-' if passed is None else 'PASS' if passed else 'FAIL'}")
    if args.kind == "features":
        print(
            f"ms per token: draft {figures['draft_ms_per_token']:.2f}, oracle {figures['oracle_ms_per_token']:.2f} "
            f"(draft/oracle {figures['cost_ratio']:.3f})"
        )
    else:
        print(
            f"ms per token: draft {figures['draft_ms_per_token']:.2f}, full-head {args.layers}-layer draft "
            f"{figures['full_head_draft_ms_per_token']:.2f}, oracle {figures['oracle_ms_per_token']:.2f} "
            f"(draft/oracle {figures['cost_ratio']:.3f})"
        )


def _evaluate_feature_draft(
    shipped: LoadedModel, oracle: LoadedModel, prompts: list[list[int]], head_ids: list[int] | None,
    args: argparse.Namespace, work: Path,
) -> dict:
    """Live greedy acceptance (a feature draft's later guesses read its own features, so there is
    no replay) against the untrained draft, first-token agreement, and the cost of one draft step."""
    model: FeatureDraftModel = shipped.model
    untrained_model = FeatureDraftModel(oracle.model, head_ids, model.feature_layers, model.norm is not None)
    untrained = dataclasses.replace(shipped, model=untrained_model.to(oracle.device).eval())
    trained = greedy_acceptance(shipped, oracle, prompts, k=args.k, max_new_tokens=args.eval_tokens, desc="trained")
    baseline = greedy_acceptance(
        untrained, oracle, prompts, k=args.k, max_new_tokens=args.eval_tokens, desc="untrained"
    )
    continuations = _cached_continuations(oracle, prompts, args.eval_tokens + args.k, work / "greedy.json")
    agreement = [
        first_token_agreement(d, oracle, prompts, continuations, args.eval_tokens) for d in (shipped, untrained)
    ]
    longest = max(prompts, key=len)
    draft_ms = step_ms(shipped, oracle, longest)
    (oracle_ms,) = ms_per_token([oracle], longest)
    return _figures(trained, baseline, agreement, draft_ms, oracle_ms)


def _figures(
    trained: AcceptanceReport, untrained: AcceptanceReport, agreement: list[float], draft_ms: float, oracle_ms: float
) -> dict:
    """The held-out figures a manifest records, trained draft against untrained."""
    return dict(
        held_out_acceptance=round(trained.acceptance_rate, 4),
        held_out_mean_acceptance_length=round(trained.mean_acceptance_length, 3),
        untrained_acceptance=round(untrained.acceptance_rate, 4),
        untrained_mean_acceptance_length=round(untrained.mean_acceptance_length, 3),
        held_out_token_agreement=round(agreement[0], 4),
        untrained_token_agreement=round(agreement[1], 4),
        draft_ms_per_token=round(draft_ms, 2),
        oracle_ms_per_token=round(oracle_ms, 2),
        cost_ratio=round(draft_ms / oracle_ms, 3),
    )


def _cached_continuations(oracle: LoadedModel, prompts: list[list[int]], length: int, cache: Path) -> list[list[int]]:
    """The oracle's greedy continuations of the held-out prompts, computed once per prompt set."""
    key = hashlib.sha256(json.dumps([prompts, length, oracle.model_id, oracle.vocab_fingerprint]).encode()).hexdigest()
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["continuations"]
    continuations = greedy_continuations(oracle, prompts, length)
    cache.write_text(json.dumps({"key": key, "continuations": continuations}))
    return continuations
