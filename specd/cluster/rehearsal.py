"""A multi-node rehearsal on one machine: `python -m specd.cluster.rehearsal`.

Starts a Ray head and two Ray worker nodes as separate processes, all bound to loopback: one
node offers the custom resource `oracle_node`, the other `draft_node`. Then runs the ordinary
`specd up --address HEAD --oracle-resources '{"oracle_node": 1}' --draft-resources
'{"draft_node": 1}'`, completes a prompt through the coordinator with `specd generate`, shows
`specctl status`, and tears everything down. Prints one JSON report with `--json`.

This is exactly the path of a real Ray cluster (deploy/README.md), with three raylets on one
host instead of three hosts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from specd.cluster.procs import spawn


def start_cluster() -> Any:
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "resources": {"head_node": 1}})
    cluster.add_node(**common, resources={"oracle_node": 1})
    cluster.add_node(**common, resources={"draft_node": 1})
    cluster.wait_for_nodes()
    return cluster


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def rehearse(oracle_model: str, draft_model: str, draft_layers: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    import ray

    cluster = start_cluster()
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        nodes = {
            n["NodeID"]: sorted(k for k in n["Resources"] if k.endswith("_node")) for n in ray.nodes() if n["Alive"]
        }
        ray.shutdown()
        up = spawn(
            "coordinator",
            {
                "address": cluster.address,
                "port": 0,
                "oracle_model": oracle_model,
                "draft_model": draft_model,
                "draft_layers": draft_layers,
                "oracle_resources": json.dumps({"oracle_node": 1}),
                "draft_resources": json.dumps({"draft_node": 1}),
                "torch_threads": 1,
            },
            command=["up"],
        )
        try:
            generated = json.loads(
                cli("specd.cli", "generate", prompt, "--address", up.address, "--max-tokens", str(max_tokens),
                    "--raw", "--json")
            )
            status = json.loads(cli("specd.cli.specctl", "--address", up.address, "--json", "status"))
            table = cli("specd.cli.specctl", "--address", up.address, "status")
        finally:
            up.stop()
    finally:
        cluster.shutdown()
    workers = {
        w["role"]: {"name": w["name"], "address": w["address"], "node_id": w["node_id"], "node_ip": w["node_ip"],
                    "node_resources": nodes.get(w["node_id"], []), "healthy": w["healthy"], "launched_by": w["launched_by"]}
        for w in status["workers"]
    }
    return {"nodes": nodes, "workers": workers, "generation": generated, "status_table": table}


def main(argv: list[str] | None = None) -> int:
    from specd.core.defaults import EMBEDDED_ORACLE, keep_local_ray_on_loopback

    keep_local_ray_on_loopback()  # this process and the `specd up` it starts
    from specd.models.shipped import default_draft_source

    parser = argparse.ArgumentParser(prog="python -m specd.cluster.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracle-model", default=EMBEDDED_ORACLE)
    parser.add_argument("--draft-model", default=None)
    parser.add_argument("--draft-layers", type=int, default=None)
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    draft_model, layers = (args.draft_model, 0) if args.draft_model else default_draft_source()
    report = rehearse(args.oracle_model, draft_model, args.draft_layers if args.draft_layers is not None else layers,
                      args.prompt, args.max_tokens)
    if args.json:
        print(json.dumps(report))
    else:
        print(report["status_table"])
        for role, w in report["workers"].items():
            print(f"{role:<7} ran on node {w['node_id'][:12]} ({', '.join(w['node_resources'])}) at {w['address']}")
        print("generated:", report["generation"]["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
