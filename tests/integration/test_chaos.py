"""`specd chaos` on tiny models: workers killed, paused and restarted under load, nothing lost."""

from __future__ import annotations

from pathlib import Path

from specd.cluster.chaos import ChaosSettings, run_chaos, tiny_pair


async def test_a_short_chaos_run_loses_nothing(tmp_path: Path):
    """Four worker processes, four clients for 40 s, a fault every 6 s (an oracle killed first, so at least one
    session moves); every output is the oracle's own."""
    oracle, draft = tiny_pair(tmp_path)
    report = await run_chaos(ChaosSettings(
        oracle=oracle, draft=draft, clients=4, seconds=40, fault_every=6, pause_seconds=6, max_tokens=32,
    ))
    print(report.render())
    assert report.requests > 0 and report.failed == 0, report.errors
    assert report.tokens_lost == 0 and report.tokens_wrong == 0
    assert {f.kind for f in report.faults} >= {"kill", "pause"} and report.migrated > 0
    assert report.memory and all(end > 0 for _, end in report.memory.values())
