"""The goals the benchmark reports against (2-core CPU, temperature 0, one client)."""

from __future__ import annotations

from specd.bench.results import ADAPTIVE, HF_ASSISTED, BenchResults, GoalCheck

SPEEDUP_GOAL = 2.0  # adaptive over the oracle alone through specd
BEST_FIXED_SHARE = 0.95  # adaptive over the best fixed k, in every category
FAR_ORACLE_MS = 50.0
FAR_ORACLE_SHARE = 0.95  # adaptive over the oracle alone at that injected round trip


def check_goals(results: BenchResults) -> list[GoalCheck]:
    return [_speedup(results), _beats_transformers(results), _best_fixed(results), _far_oracle(results)]


def _not_measured(goal: str) -> GoalCheck:
    return GoalCheck(goal=goal, measured="not measured in this run", value=None, passed=None)


def _speedup(results: BenchResults) -> GoalCheck:
    goal = f"adaptive >= {SPEEDUP_GOAL:.1f}x the oracle alone through specd (all categories)"
    adaptive = results.speed.config(ADAPTIVE) if results.speed else None
    if adaptive is None or adaptive.overall.ratio is None:
        return _not_measured(goal)
    ratio = adaptive.overall.ratio
    return GoalCheck(goal, f"{ratio:.2f}x ({adaptive.overall.tokens_per_second:.1f} tok/s)", ratio, ratio >= SPEEDUP_GOAL)


def _beats_transformers(results: BenchResults) -> GoalCheck:
    goal = "adaptive faster than transformers assisted generation (all categories)"
    speed = results.speed
    adaptive = speed.config(ADAPTIVE) if speed else None
    assisted = speed.config(HF_ASSISTED) if speed else None
    if adaptive is None or assisted is None or assisted.overall.tokens_per_second <= 0:
        return _not_measured(goal)
    share = adaptive.overall.tokens_per_second / assisted.overall.tokens_per_second
    return GoalCheck(
        goal,
        f"{share:.2f}x ({adaptive.overall.tokens_per_second:.1f} vs {assisted.overall.tokens_per_second:.1f} tok/s)",
        share,
        share > 1.0,
    )


def _best_fixed(results: BenchResults) -> GoalCheck:
    goal = f"adaptive >= {BEST_FIXED_SHARE:.2f}x the best fixed k in every category"
    if not results.speed or not results.speed.best_fixed:
        return _not_measured(goal)
    per_category = [b for b in results.speed.best_fixed if b.category != "all"]
    worst = min(b.adaptive_over_best for b in per_category)
    detail = ", ".join(f"{b.category}: {b.adaptive_over_best:.2f}x of k={b.k}" for b in per_category)
    return GoalCheck(goal, f"min {worst:.2f}x ({detail})", worst, worst >= BEST_FIXED_SHARE)


def _far_oracle(results: BenchResults) -> GoalCheck:
    goal = f"at {FAR_ORACLE_MS:g} ms injected round trip, adaptive >= {FAR_ORACLE_SHARE:.2f}x the oracle alone (every category)"
    point = next((p for p in results.rtt.points if p.delay_ms == FAR_ORACLE_MS), None) if results.rtt else None
    if point is None or not point.ratio_by_category:
        return _not_measured(goal)
    worst = min(point.ratio_by_category.values())
    detail = ", ".join(f"{c}: {r:.2f}x" for c, r in point.ratio_by_category.items())
    k = point.adaptive.overall.k_mean
    chosen = f"; adaptive's mean k {k:.2f}" if k is not None else ""
    return GoalCheck(goal, f"min {worst:.2f}x ({detail}{chosen})", worst, worst >= FAR_ORACLE_SHARE)
