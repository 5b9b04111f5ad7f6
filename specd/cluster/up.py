"""`specd up`: Ray, an oracle, a draft and the coordinator, from one command.

Locally (no --address) Ray starts bound to loopback and everything runs on this machine. With
--address the command joins an existing Ray cluster: the oracle and draft actors are placed
by the resources asked for (e.g. --oracle-resources '{"oracle_node": 1}'), so they land on
different nodes, and they listen on all interfaces of their node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time

import ray

from coordinator.config import CoordinatorConfig
from coordinator.control_plane.client import connect_ray, get_or_create_plane
from coordinator.server import start_coordinator
from draft_service.config import DraftConfig
from specd.cluster.procs import announce_ready
from specd.cluster.ray_workers import LaunchedWorker, launch_worker, stop_worker
from specd.core.defaults import COORDINATOR_PORT, EMBEDDED_ORACLE
from specd.v1 import common_pb2

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="", help="Ray cluster to join (ray://HOST:10001 or HOST:6379); '' starts Ray here")
    parser.add_argument("--host", default="127.0.0.1", help="coordinator listen address")
    parser.add_argument("--port", type=int, default=COORDINATOR_PORT)
    parser.add_argument("--metrics-port", type=int, default=-1)
    parser.add_argument(
        "--http-port", type=int, default=-1, help="serve the OpenAI-compatible HTTP API on this port (0: any; -1: off)"
    )
    parser.add_argument("--oracle-model", default=EMBEDDED_ORACLE)
    parser.add_argument("--draft-model", default=None, help="default: the shipped default draft")
    parser.add_argument("--draft-layers", type=int, default=None)
    parser.add_argument("--oracle-resources", type=json.loads, default={}, help='JSON, e.g. {"oracle_node": 1}')
    parser.add_argument("--draft-resources", type=json.loads, default={}, help='JSON, e.g. {"draft_node": 1}')
    parser.add_argument("--oracle-gpus", type=float, default=0)
    parser.add_argument("--draft-gpus", type=float, default=0)
    parser.add_argument("--oracle-device", default="cpu")
    parser.add_argument("--draft-device", default="cpu")
    parser.add_argument("--depth-policy", default="goodput")
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the workers to be healthy")


def default_draft() -> tuple[str, int]:
    """The shipped distilled draft if present, else the oracle's first layers."""
    from specd.models.shipped import default_draft_source

    return default_draft_source()


async def bring_up(args: argparse.Namespace, stop: asyncio.Event) -> None:
    connect_ray(args.address, "specd")
    listen = "0.0.0.0" if args.address else "127.0.0.1"
    draft_model, draft_layers = (args.draft_model, args.draft_layers or 0) if args.draft_model else default_draft()
    if args.draft_layers is not None:
        draft_layers = args.draft_layers
    oracle_settings = {"model": args.oracle_model, "layers": 0, "host": listen, "port": 0,
                       "device": args.oracle_device, "torch_threads": args.torch_threads}
    draft_settings = {"model": draft_model, "layers": draft_layers, "host": listen, "port": 0,
                      "device": args.draft_device, "torch_threads": args.torch_threads}
    DraftConfig(**draft_settings)  # refuse bad settings before starting anything
    print(f"starting the oracle ({args.oracle_model}) and the draft ({draft_model}) as Ray actors ...", flush=True)
    started = time.monotonic()
    launched: list[LaunchedWorker] = []
    try:
        oracle, draft = await asyncio.gather(
            launch_worker("oracle", oracle_settings, resources=args.oracle_resources, num_gpus=args.oracle_gpus),
            launch_worker("draft", draft_settings, resources=args.draft_resources, num_gpus=args.draft_gpus),
        )
        launched = [oracle, draft]
        config = CoordinatorConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port, http_port=args.http_port,
            depth_policy=args.depth_policy,
            max_depth=args.max_depth, ray_address=args.address,
        )
        plane = await get_or_create_plane(config)
        for worker, role in ((oracle, common_pb2.WORKER_ROLE_ORACLE), (draft, common_pb2.WORKER_ROLE_DRAFT)):
            await plane.call("register", role, worker.address, "", "ray-actor", worker.node_id, worker.node_ip)
        running = await start_coordinator(config, plane)
        status = await plane.call("status")
        for w in status["workers"]:
            print(f"  {w['name']:<10} {w['address']:<22} node {w['node_ip']}  {'healthy' if w['healthy'] else 'NOT healthy'}")
        print(
            f"specd is up in {time.monotonic() - started:.0f}s: coordinator at {running.address}"
            + (f", metrics on :{running.metrics_port}" if running.metrics_port > 0 else "")
            + (f", OpenAI-compatible HTTP API at http://{args.host}:{running.http_port}/v1" if running.http_port > 0 else "")
            + f"\n  specd generate --address {running.address} \"Hello\"\n  specctl --address {running.address} status",
            flush=True,
        )
        announce_ready("coordinator", running.address)
        await stop.wait()
        print("shutting down ...", flush=True)
        await running.stop()
    finally:
        for worker in launched:
            try:
                await stop_worker(worker)
            except Exception as error:
                log.warning("stopping %s: %s", worker.role, error)
        ray.shutdown()


def run(args: argparse.Namespace) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await bring_up(args, stop)

    asyncio.run(main())
    return 0
