"""`specd bench`: the measurement arithmetic, the transformers assistant built from a reduced-head
draft, and a whole `--quick` run on tiny models with every output checked."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specd.bench import register
from specd.bench.baselines import FullVocabularyHead, TransformersBaselines
from specd.bench.measure import (
    RequestRecord,
    StreamRecord,
    depth_summary,
    percentile,
    set_ratios,
    summarise,
    summarise_streams,
)
from specd.bench.prompts import CATEGORIES, load_prompt_set
from specd.models.artifact import slice_output_head
from specd.models.loader import load_model

REPO = Path(__file__).resolve().parents[2]
QUICK_DELAYS = [0.0, 50.0]
CLIENTS = [1, 4, 8]
SPEED_KEYS = [
    "transformers-generate", "transformers-assisted", *[f"specd-k{k}" for k in range(9)], "specd-adaptive",
    "specd-adaptive-no-lookup", "specd-adaptive-no-stop-rule", "specd-adaptive-chains",
]


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- arithmetic -------------------------------------------------------------------------------------


def test_a_burst_of_n_tokens_counts_n_inter_token_latencies_of_gap_over_n():
    record = StreamRecord(prompt_id="p", sent=0.0, arrivals=[(0.1, 1), (0.3, 4), (0.4, 1)], finished=0.45)
    assert record.tokens == 6
    assert record.ttft() == pytest.approx(0.1)
    assert record.inter_token_latencies() == pytest.approx([0.05] * 4 + [0.1])
    assert record.tpot() == pytest.approx((0.4 - 0.1) / 5)


def test_stream_summary_counts_failed_requests_apart():
    ok = StreamRecord(prompt_id="a", sent=0.0, arrivals=[(0.2, 2), (0.4, 2)], finished=0.5)
    failed = StreamRecord(prompt_id="b", sent=0.1, finished=0.3, error="UNAVAILABLE: gone")
    summary = summarise_streams([ok, failed])
    assert (summary.requests, summary.failed, summary.tokens) == (2, 1, 4)
    assert summary.wall_seconds == pytest.approx(0.5)
    assert summary.tokens_per_second == pytest.approx(8.0)
    assert summary.ttft_p50_ms == pytest.approx(200.0)
    assert summary.itl_p50_ms == pytest.approx(100.0)
    assert summary.errors == ["UNAVAILABLE: gone"]


def test_summaries_follow_the_defined_terms():
    records = [
        RequestRecord("a", "code", tokens=10, seconds=1.0, finish="length", drafted=8, accepted=6, rounds=4,
                      rounds_with_draft=2, depths=[4, 4, 0, 0], speculative=True),
        RequestRecord("b", "code", tokens=10, seconds=3.0, finish="eos", drafted=4, accepted=0, rounds=6,
                      rounds_with_draft=2, depths=[2, 2, 0, 0, 0, 0], speculative=True),
    ]
    cell = summarise(records)
    assert cell.tokens_per_second == pytest.approx(20 / 4.0)
    assert cell.acceptance_rate == pytest.approx(6 / 12)
    assert cell.mean_acceptance_length == pytest.approx(1 + 6 / 4)
    assert cell.k_mean == pytest.approx(12 / 10)
    assert cell.k_mode == 0
    reference = summarise([RequestRecord("a", "code", tokens=10, seconds=5.0, finish="length")])
    assert reference.acceptance_rate is None and reference.k_mean is None
    cells = {"code": cell}
    set_ratios(cells, {"code": reference})
    assert cells["code"].ratio == pytest.approx(5.0 / 2.0)
    assert depth_summary([3, 3, 5, 5, 1]) == (pytest.approx(17 / 5), 3)
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)


def test_the_shipped_prompt_set_has_every_category_and_a_warmup():
    prompts = load_prompt_set(3)
    assert prompts.categories == list(CATEGORIES)
    assert len(prompts.measured) == 3 * len(CATEGORIES)
    assert prompts.warmup.category == "warmup"
    assert len({p.id for p in prompts.measured}) == len(prompts.measured)
    assert [p.category for p in prompts.first_of_each(1)] == list(CATEGORIES)


def test_register_adds_the_bench_subcommand():
    parser = argparse.ArgumentParser(prog="specd")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--out", "somewhere", "--sections", "speed,rtt", "--seed", "3"])
    assert args.quick and args.out == Path("somewhere") and args.sections == "speed,rtt" and args.seed == 3
    from specd.bench import run

    assert args.func is run


# -- the transformers assistant of a reduced-head draft ------------------------------------------------


def test_a_reduced_head_draft_becomes_an_exact_full_vocabulary_assistant(tiny_dir):
    oracle = load_model(str(tiny_dir / "oracle"))
    draft = load_model(str(tiny_dir / "oracle"), layers=1)
    full_head = draft.model.get_output_embeddings().weight.detach().clone()
    kept = list(range(0, draft.vocab_size, 3))
    slice_output_head(draft.model, kept)
    draft.head_token_ids = kept

    baselines = TransformersBaselines(oracle, draft)
    head = draft.model.get_output_embeddings()
    assert isinstance(head, FullVocabularyHead)
    hidden = torch.randn(1, 2, full_head.shape[1])
    logits = head(hidden)  # [1, 2, vocab]
    assert logits.shape == (1, 2, draft.vocab_size)
    assert torch.allclose(logits[..., kept], hidden @ full_head[kept].T, atol=1e-5)
    others = [i for i in range(draft.vocab_size) if i not in set(kept)]
    assert torch.isneginf(logits[..., others]).all()

    prompt = oracle.tokenizer("The quick brown fox")["input_ids"]
    plain = baselines.generate(prompt, assisted=False, max_tokens=12, temperature=0.0, seed=0)
    assisted = baselines.generate(prompt, assisted=True, max_tokens=12, temperature=0.0, seed=0)
    assert assisted.token_ids == plain.token_ids  # assisted generation is lossless with this assistant
    assert plain.depths == [] and plain.oracle_calls >= len(plain.token_ids)
    assert assisted.depths and all(k >= 0 for k in assisted.depths)
    assert assisted.oracle_calls == len(assisted.depths)
    baselines.close()


# -- a whole quick run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "results"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "-m", "specd.bench", "--quick", "--passes", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "PASS" in done.stdout or "FAIL" in done.stdout
    return out


def check_cell(cell: dict, *, speculative: bool) -> None:
    assert cell["tokens"] > 0 and cell["requests"] > 0
    assert finite(cell["tokens_per_second"]) and cell["tokens_per_second"] > 0
    assert finite(cell["ratio"]) and cell["ratio"] > 0
    if speculative:
        assert finite(cell["k_mean"]) and isinstance(cell["k_mode"], int)
        if cell["drafted"] == 0:  # the adaptive policy may keep k = 0 for a useless tiny draft
            assert cell["acceptance_rate"] is None and cell["k_mean"] == 0
        else:
            assert 0 <= cell["acceptance_rate"] <= 1 and cell["mean_acceptance_length"] >= 1


def check_speed(section: dict, temperature: float) -> None:
    assert section["temperature"] == temperature
    assert "warm" in section["warmup"]
    configs = {c["key"]: c for c in section["configs"]}
    assert list(configs) == SPEED_KEYS
    for key, config in configs.items():
        speculative = key not in ("transformers-generate", "specd-k0")
        check_cell(config["overall"], speculative=speculative)
        assert sorted(config["by_category"]) == sorted(CATEGORIES)
        for cell in config["by_category"].values():
            check_cell(cell, speculative=speculative)
        assert len(config["requests"]) == len(CATEGORIES)
    assert configs["specd-k0"]["overall"]["ratio"] == pytest.approx(1.0)
    for k in range(1, 9):
        assert configs[f"specd-k{k}"]["depth"] == k
        assert max(configs[f"specd-k{k}"]["requests"][0]["depths"]) <= k
    assert configs["specd-adaptive"]["depth"] is None and configs["specd-adaptive-no-lookup"]["depth"] is None
    if temperature == 0:
        # Lossless: greedy specd, whatever k, returns exactly transformers' greedy tokens.
        for key in SPEED_KEYS[1:]:
            assert configs[key]["overall"]["same_as_reference"] == 1.0, key
    best = {b["category"]: b for b in section["best_fixed"]}
    assert sorted(best) == sorted([*CATEGORIES, "all"])
    for b in best.values():
        assert 0 <= b["k"] <= 8 and finite(b["adaptive_over_best"]) and b["adaptive_over_best"] > 0


@pytest.mark.slow
def test_quick_run_writes_every_section(quick_run: Path):
    results = json.loads((quick_run / "results.json").read_text())
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"] and machine["date"]
    assert isinstance(machine["cpu_vector"], list) and machine["torch_cpu_capability"]
    assert f"torch kernels: {machine['torch_cpu_capability']}" in (quick_run / "results.md").read_text()
    assert results["setup"]["quick"] is True
    assert results["setup"]["prompt_lookup"] == "n-grams of 3 to 8 tokens"
    assert finite(results["duration_seconds"])

    check_speed(results["speed"], 0.0)
    check_speed(results["sampled"], 0.7)
    assert (results["speed"]["passes"], results["sampled"]["passes"]) == (2, 1)  # one record per prompt kept
    assert results["sampled"]["seed"] == 0

    rtt = results["rtt"]
    assert [p["delay_ms"] for p in rtt["points"]] == QUICK_DELAYS
    for point in rtt["points"]:
        assert finite(point["ratio_overall"]) and point["ratio_overall"] > 0
        assert sorted(point["ratio_by_category"]) == sorted(CATEGORIES)
        assert all(finite(r) for r in point["ratio_by_category"].values())
        assert finite(point["adaptive"]["overall"]["k_mean"])
        check_cell(point["oracle_alone"]["overall"], speculative=False)
        assert point["oracle_alone"]["overall"]["ratio"] == pytest.approx(1.0)

    points = results["concurrency"]["points"]
    assert sorted((p["policy"], p["clients"]) for p in points) == sorted(
        [(policy, n) for policy in ("adaptive", "oracle alone", "transformers static batch") for n in CLIENTS]
        + [("adaptive, no batching", 1), ("oracle alone, no batching", 1)]  # goal (d)'s comparison
    )
    for point in points:
        s = point["summary"]
        assert s["requests"] == point["clients"] and s["failed"] == 0
        assert s["tokens"] > 0 and finite(s["tokens_per_second"]) and s["tokens_per_second"] > 0
        if point["policy"] == "transformers static batch":  # one batch: no stream, no latencies
            assert s["tokens"] == point["clients"] * results["setup"]["max_tokens"]
            continue
        for name in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            assert finite(s[name]) and s[name] >= 0, name
        assert s["ttft_p99_ms"] >= s["ttft_p50_ms"] and s["itl_p99_ms"] >= s["itl_p50_ms"]

    for role in ("oracle", "draft"):
        now, peak = results["memory_mb"][role]
        assert 0 < now <= peak
    goals = results["goals"]
    assert len(goals) == 13
    measured = [g for g in goals if g["passed"] is not None]
    # the quick run stops at 8 clients (the goals at 16 are not measured), has no llama.cpp (its two goals), and its
    # tiny draft no artifact whose held-out figures the last two goals read
    assert len(measured) == 7
    assert "first guess" in goals[-2]["goal"] and "block of 4" in goals[-1]["goal"]
    assert goals[-1]["measured"] == "not measured" and goals[-1]["passed"] is None
    for goal in measured:
        assert isinstance(goal["passed"], bool) and finite(goal["value"]) and goal["measured"]


@pytest.mark.slow
def test_quick_run_writes_the_report_and_plots(quick_run: Path):
    report = (quick_run / "results.md").read_text()
    for heading in ("## Goals", "## One client, temperature 0", "## One client, temperature 0.7",
                    "## Where the time goes", "## Injected round trip", "## Concurrent clients"):
        assert heading in report
    assert "cores" in report and "torch" in report
    assert "in 2 passes over the prompts" in report
    assert report.count("PASS") + report.count("FAIL") >= 4
    for name in ("tokens_per_second_vs_k.png", "ratio_vs_rtt.png", "latency_vs_concurrency.png"):
        data = (quick_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


@pytest.mark.slow
def test_the_concurrency_section_through_the_http_api(tmp_path: Path):
    """`--api http`: the clients stream from the OpenAI-compatible API; every request completes and is counted."""
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "specd.bench", "--quick", "--sections", "concurrency", "--clients", "1,4", "--api", "http",
         "--out", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["concurrency_api"] == "http"
    points = results["concurrency"]["points"]
    assert {p["policy"] for p in points} >= {"adaptive", "oracle alone", "adaptive, no batching"}
    for point in points:
        s = point["summary"]
        assert s["failed"] == 0 and s["tokens"] > 0, point
        if point["policy"] == "oracle alone":
            assert s["k_mean"] == 0
    assert "HTTP connection" in (out / "results.md").read_text()


def test_llama_bench_requests_become_a_whole_request_figure(tmp_path: Path):
    """What `--llama-cpp` runs and reads: llama-bench's JSON for one request (-pg P,N), the fastest of the passes and
    of the last run per prompt, and all output tokens over all those requests' seconds."""
    from specd.bench.llama_cpp import LlamaCppRows

    calls = tmp_path / "args.txt"
    binary = tmp_path / "llama-bench"

    def answer(ns: int) -> None:  # a stand-in llama-bench: one JSON row for the request it was asked
        binary.write_text(
            f"#!{sys.executable}\n"
            "import json, sys\n"
            f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
            "p, n = map(int, sys.argv[sys.argv.index('-pg') + 1].split(','))\n"
            f"print(json.dumps([{{'build_commit': 'abc123', 'build_number': 7, 'n_prompt': p, 'n_gen': n, 'avg_ns': {ns}}}]))\n"
        )
        binary.chmod(0o755)

    rows = LlamaCppRows(binary, tmp_path / "model.gguf", threads=2)
    answer(800_000_000)
    rows.record(0, prompt_tokens=40, output_tokens=48)
    rows.record(1, prompt_tokens=200, output_tokens=30)
    answer(600_000_000)  # a second pass: prompt 0 faster this time
    rows.record(0, prompt_tokens=40, output_tokens=48)
    answer(900_000_000)
    rows.record(1, prompt_tokens=200, output_tokens=30)
    assert calls.read_text().splitlines()[0].split() == [
        "-m", str(tmp_path / "model.gguf"), "-t", "2", "-p", "0", "-n", "0", "-pg", "40,48", "-r", "1", "-o", "json",
    ]
    answer(700_000_000)  # once more with specd's stack stopped: faster for prompt 1 alone
    rows.record_again()
    assert [line.split()[9] for line in calls.read_text().splitlines()[4:]] == ["40,48", "200,30"]
    result = rows.result()
    assert result is not None and result.build == "abc123 (7)"
    assert result.requests == [(40, 48, 0.6), (200, 30, 0.7)]
    assert abs(result.tokens_per_second - 78 / 1.3) < 1e-9 and result.mean_prompt_tokens == 120
    binary.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="failed to load model"):
        rows.record(2, prompt_tokens=40, output_tokens=48)


def test_the_drafts_held_out_goals_come_from_its_artifact(tiny_dir):
    """The shipped default's manifest holds its held-out measurement at k = 4: both goals measured; a draft without
    an artifact has them unmeasured."""
    from specd.bench.goals import _draft_held_out
    from specd.bench.results import BenchResults
    from specd.bench.runner import draft_goals
    from specd.models.artifact import DraftManifest
    from specd.models.sources import shipped_draft_path

    goals = draft_goals("smollm2-135m-feature-draft")
    training = DraftManifest.read(shipped_draft_path("smollm2-135m-feature-draft")).training
    assert [value for _, _, value, _ in goals] == [training["held_out_token_agreement"], training["held_out_acceptance"]]
    assert [passed for *_, passed in goals] == [value >= goal for value, goal in zip((g[2] for g in goals), (0.75, 0.55))]
    checks = _draft_held_out(BenchResults(machine={}, setup=json.loads(json.dumps({"draft_goals": goals}))))
    assert [c.value for c in checks] == [g[2] for g in goals]
    assert all(passed is None for *_, passed in draft_goals(str(tiny_dir / "oracle")))
