"""`specd generate` and `specd demo`: print a completion and its speculation stats.

Without --address the command starts a draft and an oracle worker as separate local processes
on loopback ports, runs the session loop itself, and stops them afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from coordinator.depth import FixedDepth
from coordinator.generation import Delta, GenerationRequest, stream_generation
from coordinator.pairing import connect_pair
from specd.config import DEFAULT_DRAFT_LAYERS
from specd.models import EMBEDDED_ORACLE
from specd.procs import spawn
from specd.v1 import common_pb2

LOCAL_DEFAULT_DEPTH = 4


def sampling_from_args(args: argparse.Namespace) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.seed is not None:
        sampling.seed = args.seed
    return sampling


def result_json(text: str, token_ids: list[int], final: Delta) -> dict:
    return {
        "text": text,
        "token_ids": token_ids,
        "finish_reason": final.finish.value if final.finish else "length",
        "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens},
        "stats": final.stats.summary() if final.stats else {},
    }


def print_stats(result: dict, seconds: float) -> None:
    stats, usage = result["stats"], result["usage"]
    tokens = usage["completion_tokens"]
    print(
        f"\n--\n{tokens} tokens in {seconds:.2f}s ({tokens / max(seconds, 1e-9):.1f} tok/s), "
        f"finish: {result['finish_reason']}\n"
        f"drafted {stats.get('drafted', 0)}, accepted {stats.get('accepted', 0)}, "
        f"acceptance rate {stats.get('acceptance_rate', 0):.2f}, "
        f"mean acceptance length {stats.get('mean_acceptance_length', 1):.2f}, "
        f"rounds {stats.get('rounds', 0)}",
        file=sys.stderr if result.get("_quiet") else sys.stdout,
    )


async def run_local_generation(args: argparse.Namespace) -> int:
    if args.address:
        from coordinator.client import print_remote_generation

        return await print_remote_generation(args)
    oracle_opts = {"model": args.oracle_model or EMBEDDED_ORACLE, "port": 0, "layers": 0}
    draft_opts = {
        "model": args.draft_model or EMBEDDED_ORACLE,
        "port": 0,
        "layers": args.draft_layers if args.draft_layers is not None else (0 if args.draft_model else DEFAULT_DRAFT_LAYERS),
    }
    if not args.json:
        print("starting the oracle and draft workers ...", file=sys.stderr, flush=True)
    oracle_proc = spawn("oracle", oracle_opts)
    workers = [oracle_proc]
    try:
        draft_proc = spawn("draft", draft_opts)
        workers.append(draft_proc)
        pair = await connect_pair(oracle_proc.address, draft_proc.address)
        request = GenerationRequest(
            sampling=sampling_from_args(args), max_tokens=args.max_tokens, stop=list(args.stop)
        )
        if args.raw:
            request.text = args.prompt
        else:
            request.chat = [{"role": "user", "content": args.prompt}]
        policy = FixedDepth(args.depth if args.depth is not None else LOCAL_DEFAULT_DEPTH)
        text, token_ids, final = "", [], None
        started = time.perf_counter()
        async for delta in stream_generation(request, pair, policy):
            text += delta.text
            token_ids += delta.token_ids
            if not args.json:
                print(delta.text, end="", flush=True)
            if delta.finish is not None:
                final = delta
        seconds = time.perf_counter() - started
        assert final is not None
        result = result_json(text, token_ids, final)
        if args.json:
            print(json.dumps(result))
        else:
            print_stats(result, seconds)
        return 0
    finally:
        for worker in workers:
            worker.stop()
