"""PNG plots of the results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from specd.bench.results import ADAPTIVE, HF_ASSISTED, BenchResults, SpeedResult


def write_plots(results: BenchResults, out: Path) -> list[Path]:
    """Writes the three plots; a plot whose section was not run shows a note instead."""
    categories = list(results.setup["categories"])
    return [
        _tokens_per_second_vs_k(results, categories, out / "tokens_per_second_vs_k.png"),
        _ratio_vs_rtt(results, categories, out / "ratio_vs_rtt.png"),
        _latency_vs_concurrency(results, out / "latency_vs_concurrency.png"),
    ]


def _empty(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _speed_axes(ax: plt.Axes, speed: SpeedResult | None, categories: list[str], title: str) -> None:
    if speed is None:
        _empty(ax, f"{title}: not measured")
        return
    fixed = sorted((c for c in speed.configs if c.engine == "specd" and c.depth is not None), key=lambda c: c.depth or 0)
    adaptive, assisted = speed.config(ADAPTIVE), speed.config(HF_ASSISTED)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, category in enumerate([*categories, "all"]):
        color = colors[i % len(colors)]
        pick = (lambda c: c.overall) if category == "all" else (lambda c, category=category: c.by_category.get(category))
        points = [(c.depth, pick(c).tokens_per_second) for c in fixed if pick(c) is not None]
        style = {"linewidth": 2.5, "color": "black"} if category == "all" else {"color": color}
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=category, **style)
        if adaptive is not None and pick(adaptive) is not None and pick(adaptive).k_mean is not None:
            cell = pick(adaptive)
            ax.plot([cell.k_mean], [cell.tokens_per_second], marker="*", markersize=14, linestyle="none",
                    color=style["color"], markeredgecolor="black")
        if assisted is not None and category == "all":
            ax.axhline(assisted.overall.tokens_per_second, color="gray", linestyle="--", label="transformers assisted (all)")
    ax.set_xlabel("k (draft tokens per round; 0 = oracle alone through specd)")
    ax.set_ylabel("output tokens per second")
    ax.set_title(f"{title} (stars: adaptive at its mean k)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _tokens_per_second_vs_k(results: BenchResults, categories: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    _speed_axes(axes[0], results.speed, categories, "temperature 0")
    t = results.setup.get("sampled_temperature", 0.7)
    _speed_axes(axes[1], results.sampled, categories, f"temperature {t:g}")
    return _save(fig, path)


def _ratio_vs_rtt(results: BenchResults, categories: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 5))
    if results.rtt is None or not results.rtt.points:
        _empty(ax, "injected round trip: not measured")
    else:
        points = results.rtt.points
        delays = [p.delay_ms for p in points]
        for category in categories:
            ax.plot(delays, [p.ratio_by_category.get(category, float("nan")) for p in points], marker="o", label=category)
        ax.plot(delays, [p.ratio_overall for p in points], marker="o", color="black", linewidth=2.5, label="all")
        for p in points:
            k = p.adaptive.overall.k_mean
            if k is not None:
                ax.annotate(f"k={k:.1f}", (p.delay_ms, p.ratio_overall), textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.axhline(0.95, color="red", linestyle="--", linewidth=1, label="0.95")
        ax.set_xscale("symlog", linthresh=2)
        ax.set_xlim(left=0)
        ax.set_xticks(delays, [f"{d:g}" for d in delays])
        ax.set_xlabel("injected coordinator-oracle round trip (ms)")
        ax.set_ylabel("adaptive / oracle alone (tokens per second)")
        ax.set_title("Speculation against a distant oracle (temperature 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _latency_vs_concurrency(results: BenchResults, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    conc = results.concurrency
    if conc is None or not conc.points:
        for ax in axes:
            _empty(ax, "concurrency: not measured")
    else:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, policy in enumerate(dict.fromkeys(p.policy for p in conc.points)):
            color = colors[i % len(colors)]
            points = [p for p in conc.points if p.policy == policy]
            clients = [p.clients for p in points]
            axes[0].plot(clients, [p.summary.tokens_per_second for p in points], marker="o", color=color, label=policy)
            for q, style in (("p50", "-"), ("p99", "--")):
                axes[1].plot(clients, [_nan(getattr(p.summary, f"ttft_{q}_ms")) for p in points], marker="o",
                             color=color, linestyle=style, label=f"{policy} {q}")
                axes[2].plot(clients, [_nan(getattr(p.summary, f"itl_{q}_ms")) for p in points], marker="o",
                             color=color, linestyle=style, label=f"{policy} {q}")
        for ax, title, unit in (
            (axes[0], "aggregate throughput", "output tokens per second"),
            (axes[1], "time to first token", "ms"),
            (axes[2], "inter-token latency (per token)", "ms"),
        ):
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(unit)
            ax.set_title(title)
            ax.set_xticks(sorted({p.clients for p in conc.points}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value
