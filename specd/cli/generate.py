"""`specd generate` and `specd demo`: print a completion and its speculation stats.

With --address the command talks to a running coordinator and streams the text as rounds
complete. Without it, it starts a draft and an oracle worker as separate local processes on
loopback ports, runs the session loop itself, and stops them afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.depth import FixedDepth
from coordinator.session.generation import GenerationRequest, stream_generation
from coordinator.session.pairing import connect_pair
from specd.client import SpecdClient
from specd.cluster.procs import spawn
from specd.core.defaults import COORDINATOR_PORT, EMBEDDED_ORACLE
from specd.models.shipped import default_draft_source
from specd.rpc.security import Security
from specd.v1 import common_pb2

LOCAL_DEFAULT_DEPTH = 4


def stats_line(result: dict[str, Any], seconds: float) -> str:
    stats, usage = result["stats"], result["usage"]
    tokens = usage["completion_tokens"]
    lookup = (
        f" (prompt lookup {stats['lookup_accepted']} of {stats['lookup_drafted']})" if stats.get("lookup_drafted") else ""
    )
    cached = stats.get("cached_prompt_tokens") or 0
    reused = f" ({cached} prompt tokens from the prefix cache)" if cached else ""
    return (
        f"{tokens} tokens in {seconds:.2f}s ({tokens / max(seconds, 1e-9):.1f} tok/s), "
        f"finish: {result['finish_reason']}{reused}\n"
        f"drafted {stats.get('drafted', 0)}, accepted {stats.get('accepted', 0)}{lookup}, "
        f"acceptance rate {stats.get('acceptance_rate', 0):.2f}, "
        f"mean acceptance length {stats.get('mean_acceptance_length', 1):.2f}, rounds {stats.get('rounds', 0)}, "
        f"k per round {compact(stats.get('depth_per_round', []))}"
    )


def compact(depths: list[int]) -> str:
    """Run-length form of the k sequence: 4x3 8x12 ..."""
    runs: list[list[int]] = []
    for k in depths:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    return " ".join(f"{k}x{n}" if n > 1 else str(k) for k, n in runs) or "-"


class Output:
    """Prints text as it arrives (or one JSON object at the end with --json)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.text = ""
        self.ids: list[int] = []
        self.started = time.perf_counter()

    def add(self, text: str, ids: list[int]) -> None:
        self.text += text
        self.ids += ids
        if not self.args.json:
            print(text, end="", flush=True)

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, stats: Any) -> None:
        result = {
            "text": self.text,
            "token_ids": self.ids,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "stats": proto_stats(stats),
        }
        if self.args.json:
            print(json.dumps(result))
        else:
            print("\n--\n" + stats_line(result, time.perf_counter() - self.started))


def proto_stats(stats: Any) -> dict[str, Any]:
    return {
        "rounds": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted,
        "lookup_drafted": stats.lookup_drafted, "lookup_accepted": stats.lookup_accepted,
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
        "depth_per_round": list(stats.depth_per_round),
        "accepted_per_position": list(stats.accepted_per_position),
        "drafted_per_position": list(stats.drafted_per_position),
        "draft_seconds": round(stats.draft_seconds, 4), "verify_seconds": round(stats.verify_seconds, 4),
        "network_seconds": round(stats.network_seconds, 4), "total_seconds": round(stats.total_seconds, 4),
        "time_to_first_token_seconds": round(stats.time_to_first_token_seconds, 4),
        "open_seconds": round(stats.open_seconds, 4), "cached_prompt_tokens": stats.cached_prompt_tokens,
        "draft_worker": stats.draft_worker, "oracle_worker": stats.oracle_worker, "migrations": stats.migrations,
    }


def find_coordinator(address: str | None) -> str | None:
    """The coordinator to use: the one named (--address, else SPECD_ADDRESS), else the local default one if it
    answers; None when there is none (the caller then starts workers of its own). Says which it chose."""
    named = address or os.environ.get("SPECD_ADDRESS")
    if named:
        return named
    local_default = f"127.0.0.1:{COORDINATOR_PORT}"
    with Security.from_env().channel(local_default) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            reply = None
    if reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING:
        print(f"using the coordinator at {local_default}", file=sys.stderr, flush=True)
        return local_default
    print(
        f"no coordinator answers at {local_default} (start one with `specd up`, or name one with --address or "
        "SPECD_ADDRESS): starting an oracle and a draft for this request",
        file=sys.stderr, flush=True,
    )
    return None


def remote(args: argparse.Namespace, address: str) -> int:
    """Stream from a running coordinator."""
    prompt: dict[str, Any] = {"prompt": args.prompt} if args.raw else {"messages": [{"role": "user", "content": args.prompt}]}
    output, final = Output(args), None
    with SpecdClient(address) as client:
        for chunk in client.stream(
            **prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed, stop=args.stop, depth=args.depth,
        ):
            output.add(chunk.text, chunk.token_ids)
            if chunk.finish_reason is not None:
                final = chunk
    assert final is not None and final.stats is not None
    output.finish(final.finish_reason, final.prompt_tokens, final.completion_tokens, final.stats)
    return 0


async def local(args: argparse.Namespace) -> int:
    """Start both workers here, run the loop in this process."""
    if args.draft_model:
        draft_model, draft_layers = args.draft_model, 0
    else:
        draft_model, draft_layers = default_draft_source()
    if args.draft_layers is not None:
        draft_layers = args.draft_layers
    if not args.json:
        print(f"starting the oracle and draft ({draft_model}) workers ...", file=sys.stderr, flush=True)
    oracle_proc = spawn("oracle", {"model": args.oracle_model or EMBEDDED_ORACLE, "port": 0, "layers": 0})
    workers = [oracle_proc]
    try:
        draft_proc = spawn("draft", {"model": draft_model, "port": 0, "layers": draft_layers})
        workers.append(draft_proc)
        pair = await connect_pair(oracle_proc.address, draft_proc.address)
        sampling = common_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.seed is not None:
            sampling.seed = args.seed
        request = GenerationRequest(sampling=sampling, max_tokens=args.max_tokens, stop=list(args.stop))
        if args.raw:
            request.text = args.prompt
        else:
            request.chat = [{"role": "user", "content": args.prompt}]
        policy = FixedDepth(args.depth if args.depth is not None else LOCAL_DEFAULT_DEPTH)
        output, final = Output(args), None
        async for delta in stream_generation(request, pair, policy):
            output.add(delta.text, delta.token_ids)
            if delta.finish is not None:
                final = delta
        assert final is not None and final.finish is not None and final.stats is not None
        output.finish(final.finish.value, final.prompt_tokens, final.completion_tokens, final.stats.to_proto())
        return 0
    finally:
        for worker in workers:
            worker.stop()


def demo(args: argparse.Namespace) -> int:
    """`specd up` in the background, one streamed completion through the coordinator, shut down."""
    print("specd demo: starting Ray, the default oracle and draft, and the coordinator (specd up) ...", flush=True)
    up = spawn("coordinator", {"port": 0}, command=["up"])
    try:
        print(f"coordinator ready at {up.address}\n\nprompt: {args.prompt}\n", flush=True)
        return remote(args, up.address)
    finally:
        up.stop()
