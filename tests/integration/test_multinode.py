"""Multi-node rehearsal: a Ray head and two worker nodes as separate processes; the coordinator
places the oracle and the draft on different nodes by resources, and a generation runs through them."""

from __future__ import annotations

import json
import subprocess
import sys

from specd.models.tiny import build_tokenizer
from tests.conftest import greedy_reference


def test_oracle_and_draft_land_on_different_nodes(tiny_dir):
    prompt = "The quick brown fox"
    done = subprocess.run(
        [sys.executable, "-m", "specd.cluster.rehearsal", "--json", "--oracle-model", str(tiny_dir / "oracle"),
         "--draft-model", str(tiny_dir / "oracle"), "--prompt", prompt, "--max-tokens", "12"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) == 3
    oracle, draft = report["workers"]["oracle"], report["workers"]["draft"]
    assert oracle["node_id"] != draft["node_id"]
    assert oracle["node_resources"] == ["oracle_node"]
    assert draft["node_resources"] == ["draft_node"]
    assert oracle["launched_by"] == draft["launched_by"] == "ray-actor"
    assert oracle["healthy"] and draft["healthy"]
    assert oracle["address"].startswith("127.0.0.1:") and draft["address"].startswith("127.0.0.1:")
    assert "oracle-1" in report["status_table"] and "draft-1" in report["status_table"]
    generation = report["generation"]
    ids = build_tokenizer()(prompt)["input_ids"]
    expected = greedy_reference(tiny_dir / "oracle", ids, 12)
    assert generation["token_ids"] == expected[: len(generation["token_ids"])]
    assert generation["usage"]["completion_tokens"] == len(generation["token_ids"]) > 0
    assert generation["stats"]["draft_worker"] == draft["address"]
