"""`specd distill` end to end on a tiny oracle, and the pieces it is built from."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import chisquare

from specd.cli import distill as distill_cli
from specd.core.errors import InvalidArgument
from specd.models.artifact import DraftManifest, slice_output_head
from specd.models.loader import load_model
from specd.models.sources import DRAFT_ARTIFACT_MANIFEST, shipped_draft_path
from specd.models.tiny import write_tiny_model
from specd.training import answers as stage_answers
from specd.training import dataset, evaluation, pipeline
from specd.training import prompts as prompt_set

WORDS = ["fox", "dog", "sea", "code", "tea", "rain", "moon", "cake", "bird", "tree", "lamp", "road"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    write_tiny_model(root / "oracle", seed=3, layers=4, hidden=64)
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(48):
            prompt = f"Tell me about the {WORDS[i % 12]} and the {WORDS[(5 * i + 1) % 12]}, number {i}."
            f.write(json.dumps({"kind": "chat", "prompt": prompt}) + "\n")
    return root


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specd")
    distill_cli.register(parser.add_subparsers(required=True))
    return parser.parse_args(["distill", *argv])


def tiny_args(root: Path, *extra: str) -> argparse.Namespace:
    return parse(
        "--oracle", str(root / "oracle"), "--out", str(root / "draft"), "--prompts", str(root / "prompts.jsonl"),
        "--layers", "1", "--head-vocab", "128", "--answers-per-prompt", "2", "--max-new-tokens", "24",
        "--gen-batch-size", "16", "--batch-size", "8", "--lr", "3e-3", "--held-out", "0.2",
        "--eval-tokens", "24", "--checkpoint-every", "10", "--seed", "1", *extra,
    )


def test_distill_end_to_end_then_resume(setup: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    args = tiny_args(setup, "--steps", "40")
    assert args.func is pipeline.run
    assert args.func(args) == 0
    out = setup / "draft"

    draft = load_model(str(out))
    oracle = load_model(str(setup / "oracle"))
    assert draft.vocab_fingerprint == oracle.vocab_fingerprint
    assert draft.vocab_size == oracle.vocab_size
    assert draft.model.config.num_hidden_layers == 1
    manifest = DraftManifest.read(out)
    assert manifest.layers == 1
    assert draft.head_token_ids == manifest.head_token_ids
    assert len(draft.head_token_ids) >= 128 and set(oracle.eos_token_ids) <= set(draft.head_token_ids)
    logits = draft.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == len(draft.head_token_ids)  # [1, 3, head vocab]

    # Only the retrained tensors are stored: the layer and the final norm, not the embedding or the head.
    stored = load_file(str(out / manifest.weights))
    assert stored and all(name.startswith(("model.layers.0.", "model.norm.")) for name in stored)

    training = manifest.training
    assert training["steps"] == 40 and training["seed"] == 1 and training["tokens"] > 0
    assert training["held_out_prompts"] > 0
    assert training["held_out_acceptance"] > training["untrained_acceptance"] + 0.2
    assert training["draft_ms_per_token"] > 0 and training["oracle_ms_per_token"] > 0

    # The replayed acceptance the command reports equals a live drafter/verifier loop, for the
    # distilled draft (reduced head) and for the untrained truncated one.
    _, held_out = prompt_set.split_held_out(prompt_set.load_prompts(setup / "prompts.jsonl"), 0.2)
    prompts = [prompt_set.encode_prompt(oracle, p, 400) for p in held_out[:4]]
    continuations = evaluation.greedy_continuations(oracle, prompts, 24 + 4)
    for candidate in (draft, load_model(str(setup / "oracle"), layers=1)):
        live = evaluation.greedy_acceptance(candidate, oracle, prompts, k=4, max_new_tokens=24)
        replayed = evaluation.replay_acceptance(
            candidate, prompts, continuations, eos_token_ids=oracle.eos_token_ids, k=4, max_new_tokens=24,
            context=oracle.max_context,
        )
        assert replayed == live

    # A rerun with more steps continues from the checkpoint and reuses the oracle's cached answers.
    capsys.readouterr()

    def no_generation(*_args, **_kwargs):
        raise AssertionError("the cached answers should have been reused")

    monkeypatch.setattr(stage_answers, "generate_batch", no_generation)
    args = tiny_args(setup, "--steps", "60")
    assert args.func(args) == 0
    assert "resuming from" in capsys.readouterr().out
    checkpoint = torch.load(out / pipeline.WORK_DIR / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 60
    resumed = DraftManifest.read(out).training
    assert resumed["steps"] == 60
    assert resumed["tokens"] > training["tokens"]
    assert resumed["held_out_acceptance"] > resumed["untrained_acceptance"]


def test_the_nucleus_sampler_draws_from_the_top_p_distribution():
    """The oracle's answers are drawn by top-p among the likeliest candidates, one token per row, with
    scores that leave generate nothing to do but take the argmax."""
    logits = torch.tensor([2.0, 1.6, 1.0, 0.3, -0.5, -1.0, -2.0, -4.0] + [-9.0] * 24)
    probs = torch.softmax(logits.double(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    nucleus = torch.where(before < 0.9, probs, 0.0)
    expected = nucleus / nucleus.sum()
    draws = 24_000
    torch.manual_seed(0)
    scores = stage_answers._NucleusSampler(0.9, candidates=16)(None, logits.expand(draws, -1).clone())
    assert ((scores == 0).sum(-1) == 1).all() and (torch.isinf(scores).sum(-1) == len(logits) - 1).all()
    counts = torch.bincount(scores.argmax(-1), minlength=len(logits)).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0  # outside the nucleus: never
    assert chisquare(counts[kept].numpy(), (expected[kept] * draws).numpy()).pvalue > 1e-3
    torch.manual_seed(5)
    again = stage_answers._NucleusSampler(0.9, candidates=16)(None, logits.expand(64, -1).clone())
    torch.manual_seed(5)
    assert torch.equal(again, stage_answers._NucleusSampler(0.9, candidates=16)(None, logits.expand(64, -1).clone()))


def test_distill_loss_is_the_kl_when_targets_cover_the_vocabulary():
    torch.manual_seed(0)
    vocab, hidden, n = 12, 8, 5
    h = torch.randn(n, hidden)
    head = torch.randn(vocab, hidden)
    logp = torch.log_softmax(torch.randn(n, vocab) * 2, dim=-1)
    rows = torch.arange(vocab).repeat(n, 1)
    loss, kl = dataset.distill_loss(h, head, rows, logp)
    logq = torch.log_softmax(h @ head.T, dim=-1)
    exact = (logp.exp() * (logp - logq)).sum(-1).mean()
    assert torch.allclose(kl, exact, atol=1e-5)
    # Keeping only the top tokens, the rest lumped into one bucket, gives a lower bound.
    top = torch.topk(logp, 3, dim=-1)
    _, kl_top = dataset.distill_loss(h, head, top.indices, top.values)
    assert 0 <= float(kl_top) <= float(exact) + 1e-6


def test_held_out_split_is_deterministic_and_disjoint():
    prompts = prompt_set.load_prompts(prompt_set.DEFAULT_PROMPTS)
    assert len(prompts) >= 300
    assert {"chat", "code", "extract", "creative", "qa"} <= {p.kind for p in prompts}
    train, held_out = prompt_set.split_held_out(prompts, 0.1)
    again_train, again_held_out = prompt_set.split_held_out(list(reversed(prompts)), 0.1)
    assert {p.key for p in held_out} == {p.key for p in again_held_out}
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert len(train) + len(held_out) == len(prompts)
    assert 0.05 < len(held_out) / len(prompts) < 0.15


def test_reduced_head_scores_the_chosen_rows(setup: Path):
    loaded = load_model(str(setup / "oracle"), layers=1)
    ids = torch.tensor([[5, 9, 40, 7]])
    full = loaded.model(input_ids=ids).logits  # [1, 4, vocab]
    head_ids = [0, 3, 17, 42, 200]
    slice_output_head(loaded.model, head_ids)
    reduced = loaded.model(input_ids=ids).logits  # [1, 4, 5]
    assert torch.allclose(reduced, full[..., head_ids], atol=1e-5)


def test_head_vocab_keeps_the_most_emitted_tokens_and_eos():
    answers = [
        stage_answers.OracleAnswer(
            prompt_ids=[1], answer_ids=[7, 7, 7, 4, 4, 9],
            top_ids=torch.tensor([[7, 4]] * 6, dtype=torch.int32),
            top_logprobs=torch.log(torch.tensor([[0.6, 0.4]] * 6)).half(),
        )
    ]
    assert dataset.choose_head_vocab(answers, 2, eos_token_ids=[0], vocab_size=50) == [0, 4, 7]


def test_manifest_is_checked(tmp_path: Path):
    (tmp_path / DRAFT_ARTIFACT_MANIFEST).write_text(json.dumps({"format": 99, "base": "x", "layers": 1}))
    with pytest.raises(Exception, match="unsupported draft format"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("recipe", "device"),
    [
        ("eagle", "cpu"),
        ("eagle3", "cpu"),
        pytest.param("eagle3", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
    ],
)
def test_feature_draft_distills_and_beats_untrained(setup: Path, recipe: str, device: str):
    """--kind features under each recipe: trained on the oracle's features (every stage on --device), loaded by
    path on the CPU, better than untrained."""
    out = setup / f"feature-draft-{recipe}-{device}"
    args = tiny_args(
        setup, "--kind", "features", "--recipe", recipe, "--steps", "60", "--k", "3", "--unroll", "3",
        "--device", device,
    )
    args.out = out
    assert args.func(args) == 0
    manifest = DraftManifest.read(out)
    assert manifest.kind == "features" and manifest.layers == 1
    figures = manifest.training
    assert figures["unroll"] == 3 and figures["recipe"] == recipe
    assert figures["device"] == ("cpu" if device == "cpu" else torch.cuda.get_device_name())
    stored = load_file(str(out / manifest.weights))
    # eagle3 reads a low, a middle and the final state of the 4-layer oracle (low and middle are both 2 here)
    read = [2, 4] if recipe == "eagle3" else []
    assert manifest.feature_layers == read and manifest.head_norm == (recipe == "eagle3")
    trained = ("fuse.", "layer.", "reduce.", "norm.") if read else ("fuse.", "layer.")
    assert {name.split(".")[0] + "." for name in stored} == set(trained)
    draft = load_model(str(out))
    assert draft.device.type == "cpu" and draft.feature_dim == 64 and draft.feature_layers == tuple(read)
    assert draft.head_token_ids == manifest.head_token_ids
    assert figures["held_out_token_agreement"] > figures["untrained_token_agreement"]
    assert figures["held_out_acceptance"] > figures["untrained_acceptance"]
    assert figures["draft_ms_per_token"] > 0 and figures["cost_ratio"] > 0
    # Resuming with the same settings trains no further and reuses the cached oracle features.
    assert sorted((out / "work" / ("features" + "".join(f"-{i}" for i in read))).glob("chunk-*.pt"))


def test_distill_refuses_a_device_it_cannot_use_and_a_bad_unroll(setup: Path):
    for device in ("tpu", "nonsense"):
        with pytest.raises(InvalidArgument, match=f"device.*{device}"):
            pipeline.run(tiny_args(setup, "--device", device))
        with pytest.raises(InvalidArgument, match=f"device.*{device}"):  # the workers' loading path too
            load_model(str(setup / "oracle"), device=device)
    with pytest.raises(InvalidArgument, match="--unroll"):
        pipeline.run(tiny_args(setup, "--kind", "features", "--unroll", "0"))
    with pytest.raises(InvalidArgument, match="not hidden states of this oracle"):
        pipeline.run(tiny_args(setup, "--kind", "features", "--feature-layers", "1,9"))
    with pytest.raises(InvalidArgument, match="list 4 last"):
        pipeline.run(tiny_args(setup, "--kind", "features", "--feature-layers", "4,1"))
    with pytest.raises(InvalidArgument, match="needs eagle3"):
        pipeline.run(tiny_args(setup, "--kind", "features", "--recipe", "eagle", "--feature-layers", "1,4"))
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="no CUDA device"):
            pipeline.run(tiny_args(setup, "--device", "cuda"))


def makefile_distill_commands() -> dict[str, list[str]]:
    """The Makefile's `specd distill` command lines, by target, with make variables left as words."""
    text = (Path(__file__).resolve().parents[2] / "Makefile").read_text().replace("\\\n", " ")
    commands, target = {}, None
    for line in text.splitlines():
        rule = re.match(r"([\w.-]+):(?!=)", line)  # a target's line, not a `NAME := value`
        if rule:
            target = rule.group(1)
        elif line.startswith("\t") and " distill " in line:
            argv = line.split()
            commands[target] = argv[argv.index("distill") + 1 :]
    return commands


def test_makefile_recipes_are_valid_distill_commands():
    """`make draft`, `make draft-cpu` and `make draft-standalone` hold commands the parser accepts."""
    commands = makefile_distill_commands()
    assert set(commands) == {"draft", "draft-cpu", "draft-standalone"}
    parsed = {target: parse(*argv) for target, argv in commands.items()}
    assert parsed["draft"].device == "cuda" and parsed["draft"].kind == "features"
    assert parsed["draft-cpu"].device == "cpu" and parsed["draft-cpu"].kind == "features"
    assert parsed["draft-standalone"].kind == "layers"
    assert parsed["draft"].recipe == parsed["draft-cpu"].recipe == "eagle3"
    # The shipped default was made by `make draft`: its manifest records the same settings, with the recipe
    # it was made by (one made before the eagle3 recipe records none: "eagle").
    manifest = DraftManifest.read(shipped_draft_path("smollm2-135m-feature-draft"))
    recipe, training = parsed["draft"], manifest.training
    assert training["steps"] == recipe.steps and training["batch_size"] == recipe.batch_size
    assert training["lr"] == recipe.lr
    if training.get("recipe", "eagle") == recipe.recipe:
        assert training["unroll"] == recipe.unroll
        assert manifest.feature_layers and manifest.head_norm
    assert training["answer_settings"]["answers_per_prompt"] == recipe.answers_per_prompt
    assert training["answer_settings"]["max_new_tokens"] == recipe.max_new_tokens
    assert len(manifest.head_token_ids) >= recipe.head_vocab


def test_cli_reports_a_users_mistake_as_a_message(tmp_path: Path, capsys: pytest.CaptureFixture):
    """`specd distill` with a device torch cannot use: exit status 2 and one line, no traceback."""
    from specd.cli.main import main

    assert main(["distill", "--out", str(tmp_path / "draft"), "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specd distill: device 'tpu'") and "Traceback" not in err
    assert not (tmp_path / "draft").exists()  # refused before any work
