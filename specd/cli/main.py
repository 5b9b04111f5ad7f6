"""`specd`: serve the workers and the coordinator, generate, benchmark, distill.

    specd serve oracle|draft|coordinator [--port ...]  run one service (flags mirror its config)
    specd up                                 Ray + oracle + draft + coordinator on this machine (or --address)
    specd generate PROMPT [--address A] [--json]   complete a prompt (streams text by default)
    specd demo                               `specd up`, one completion with speculation stats, shut down
    specd bench [--quick]                    the benchmark (results/latest: JSON, Markdown, plots)
    specd distill --oracle M --out DIR       train a draft for an oracle, offline
    specd health ADDRESS                     exit 0 when grpc.health.v1 reports SERVING
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from pydantic import BaseModel, ValidationError

from specd.cluster.roles import CONFIGS

DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[BaseModel]) -> None:
    """One --flag per settings field; unset flags fall back to the environment, then defaults."""
    for name, field in config_cls.model_fields.items():
        kind = field.annotation if field.annotation in (int, float) else str
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
            help=f"{field.description} (default: {shown_default(field)})",
        )


def shown_default(field: Any) -> str:
    """A field's default as a person would type it (a list as comma-separated values; none: empty)."""
    default = field.get_default(call_default_factory=True)
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default)) or "none"
    return str(default)


def config_from_args(config_cls: type[BaseModel], args: argparse.Namespace) -> Any:
    values = {name: getattr(args, name) for name in config_cls.model_fields if getattr(args, name, None) is not None}
    try:
        return config_cls(**values)
    except ValidationError as error:
        raise SystemExit(f"invalid {config_cls.__name__}:\n{error}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from specd.cluster.procs import announce_ready
    from specd.cluster.roles import service
    from specd.rpc.launch import serve_worker

    config = config_from_args(CONFIGS[args.role], args)
    asyncio.run(serve_worker(service(args.role), config, on_ready=lambda host: announce_ready(args.role, host.address)))
    return 0


def cmd_serve_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.server import start_coordinator
    from specd.cluster.procs import announce_ready

    config = config_from_args(CoordinatorConfig, args)

    async def serve() -> None:
        running = await start_coordinator(config)
        running.host.install_signal_handlers()
        announce_ready("coordinator", running.address)
        await running.host.wait()

    asyncio.run(serve())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from specd.cluster.up import run

    return run(args)


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from specd.rpc.security import Security

    with Security.from_env().channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--depth", type=int, default=None, help="fixed speculation depth k (default: adaptive)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    parser.add_argument(
        "--address", default=None,
        help="a running coordinator (host:port); default: SPECD_ADDRESS, or the coordinator at 127.0.0.1:50050 if "
        "one answers there; otherwise an oracle and a draft are started for this one request",
    )
    parser.add_argument("--oracle-model", default=None, help="local mode: the oracle's model source")
    parser.add_argument("--draft-model", default=None, help="local mode: the draft's model source")
    parser.add_argument("--draft-layers", type=int, default=None, help="local mode: keep the draft's first N layers")


def cmd_generate(args: argparse.Namespace) -> int:
    from specd.cli import generate as generate_cmd

    address = generate_cmd.find_coordinator(args.address)
    if address is not None:
        return generate_cmd.remote(args, address)
    return asyncio.run(generate_cmd.local(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from specd.cli import generate as generate_cmd

    args.prompt = args.prompt or DEMO_PROMPT
    return generate_cmd.demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specd", description="Distributed lossless speculative decoding.")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a worker")
    roles = serve.add_subparsers(dest="role", required=True)
    for role, config_cls in CONFIGS.items():
        sub = roles.add_parser(role, help=f"run a{'n' if role == 'oracle' else ''} {role} worker")
        add_config_arguments(sub, config_cls)
        sub.set_defaults(func=cmd_serve)
    from coordinator.config import CoordinatorConfig

    sub = roles.add_parser("coordinator", help="run the coordinator (client and admin APIs) on Ray")
    add_config_arguments(sub, CoordinatorConfig)
    sub.set_defaults(func=cmd_serve_coordinator)

    up = commands.add_parser("up", help="start Ray, an oracle, a draft and the coordinator, and wait")
    from specd.cluster.up import add_arguments as add_up_arguments

    add_up_arguments(up)
    up.set_defaults(func=cmd_up)

    generate = commands.add_parser("generate", help="complete a prompt")
    generate.add_argument("prompt")
    add_generation_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="start everything, complete one prompt with speculation stats, stop")
    demo.add_argument("prompt", nargs="?", default=None)
    add_generation_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    from specd import bench
    from specd.bench import quality
    from specd.cli import distill
    from specd.cluster import chaos

    bench.register(commands)
    quality.register(commands)
    distill.register(commands)
    chaos.register(commands)

    health = commands.add_parser("health", help="check a server's grpc.health.v1 status")
    health.add_argument("address")
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=cmd_health)
    return parser


def _uses_local_ray(argv: list[str]) -> bool:
    """Whether this command starts a Ray of its own on this machine (rather than joining one)."""
    import os

    if argv[:1] in (["demo"], ["chaos"]):
        return True
    if argv[:1] == ["up"]:
        return "--address" not in argv and not any(a.startswith("--address=") for a in argv)
    if argv[:2] == ["serve", "coordinator"]:
        joined = "--ray-address" in argv or any(a.startswith("--ray-address=") for a in argv)
        return not joined and not os.environ.get("SPECD_COORDINATOR_RAY_ADDRESS")
    return False


def main(argv: list[str] | None = None) -> int:
    from specd.core.defaults import quiet_idle_threads

    quiet_idle_threads()
    argv = sys.argv[1:] if argv is None else argv
    if _uses_local_ray([a for a in argv if a not in ("-v", "--verbose")]):
        from specd.core.defaults import keep_local_ray_on_loopback

        keep_local_ray_on_loopback()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import grpc

    from specd.core.errors import SpecdError

    try:
        return args.func(args)
    except SpecdError as error:  # a user's mistake: the message, not a traceback
        print(f"specd {args.command}: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:  # a server's answer, e.g. INVALID_ARGUMENT for a bad request
        print(f"specd {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
