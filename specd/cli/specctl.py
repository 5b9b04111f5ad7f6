"""`specctl`: operate a running coordinator.

    specctl status                       workers, health, load, pairs
    specctl sessions                     sessions in flight with their k and acceptance
    specctl depth get [--pair P]         depth policy per pair
    specctl depth set POLICY [--pair P]  goodput | heuristic | fixed:K (no --pair: the default)
    specctl drain WORKER [--migrate] | undrain WORKER   (--migrate: move its sessions away now)
    specctl stats                        acceptance per pair and per position, k over time
    specctl register draft|oracle ADDRESS [--name N]
    specctl deregister WORKER

Human tables by default; --json prints one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from specd.core.defaults import COORDINATOR_PORT
from specd.rpc.security import ADMIN, Security
from specd.v1 import admin_pb2, admin_pb2_grpc, common_pb2

ROLES = {"draft": common_pb2.WORKER_ROLE_DRAFT, "oracle": common_pb2.WORKER_ROLE_ORACLE}


def to_plain(message: Message) -> dict[str, Any]:
    """Protobuf -> plain dict with every field, ints as ints and roles as 'draft'/'oracle'."""

    def value(field: FieldDescriptor, v: Any) -> Any:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return to_plain(v)
        if field.type == FieldDescriptor.TYPE_ENUM:
            name = field.enum_type.values_by_number[v].name
            return name.removeprefix("WORKER_ROLE_").lower()
        return v

    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        raw = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [value(field, item) for item in raw]
        else:
            out[field.name] = value(field, raw)
    return out


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show_load(load: common_pb2.WorkerLoad) -> str:
    """busy share, rows per pass and queue, e.g. '35% 12.0r q2'; '-' for a worker that reports none."""
    if not load.rows_per_step and not load.queued:
        return "-"
    return f"{load.busy_fraction:.0%} {load.rows_per_step:.1f}r q{load.queued}"


def show_status(reply: admin_pb2.ClusterStatus) -> str:
    workers = [
        [
            w.name, "draft" if w.role == common_pb2.WORKER_ROLE_DRAFT else "oracle", w.address,
            "healthy" if w.healthy else f"UNHEALTHY ({w.error})",
            ("migrating" if w.migrating else "draining") if w.draining else "-",
            f"{w.assigned_sessions}/{w.max_sessions}", show_load(w.load),
            f"{w.resident_mb:.0f} MB" if w.resident_mb else "-", w.weights or "-", w.model_id,
            f"{w.node_ip} {w.node_id[:8]}" if w.node_id else "-", w.launched_by,
        ]
        for w in reply.workers
    ]
    pairs = [[p.pair_id, p.draft or "(oracle alone)", p.oracle, p.depth_policy, "yes" if p.usable else "no"] for p in reply.pairs]
    return (
        table(workers, [
            "WORKER", "ROLE", "ADDRESS", "HEALTH", "DRAIN", "SESSIONS", "LOAD", "MEMORY", "WEIGHTS", "MODEL", "NODE",
            "LAUNCHED",
        ])
        + "\n\n"
        + table(pairs, ["PAIR", "DRAFT", "ORACLE", "DEPTH POLICY", "USABLE"])
        + f"\n\nactive sessions: {reply.active_sessions}   default depth policy: {reply.default_depth_policy}"
    )


def show_sessions(reply: admin_pb2.SessionList) -> str:
    rows = [
        [s.session_id[:12], s.pair_id, s.depth, s.generated_tokens, s.drafted, s.accepted, f"{s.acceptance_rate:.2f}", f"{s.age_seconds:.1f}s"]
        for s in reply.sessions
    ]
    return table(rows, ["SESSION", "PAIR", "K", "TOKENS", "DRAFTED", "ACCEPTED", "ACCEPTANCE", "AGE"]) if rows else "no sessions in flight"


def show_policies(reply: admin_pb2.DepthPolicies) -> str:
    rows = [[p.pair_id, p.policy, p.next_depth] for p in reply.pairs]
    return table(rows, ["PAIR", "POLICY", "NEXT K"]) + f"\n\ndefault: {reply.default_policy}"


def show_stats(reply: admin_pb2.PairStatsList) -> str:
    if not reply.pairs:
        return "no finished sessions yet"
    parts = []
    for p in reply.pairs:
        per_pos = " ".join(
            f"{a / d:.2f}" if d else "-" for a, d in zip(p.accepted_per_position, p.drafted_per_position)
        )
        recent = " ".join(str(s.depth) for s in p.depth_history[-20:])
        parts.append(
            f"{p.pair_id}  policy {p.depth_policy}\n"
            f"  sessions {p.sessions}  rounds {p.rounds}  drafted {p.draft_tokens}  accepted {p.accepted_tokens}\n"
            f"  acceptance rate {p.acceptance_rate:.3f}  mean acceptance length {p.mean_acceptance_length:.2f}\n"
            f"  acceptance per position: {per_pos or '-'}\n"
            f"  k over time (latest last): {recent or '-'}"
        )
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specctl", description="Operate a specd coordinator.")
    parser.add_argument(
        "--address", default=os.environ.get("SPECD_ADDRESS", f"127.0.0.1:{COORDINATOR_PORT}"),
        help="coordinator host:port (env SPECD_ADDRESS)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--timeout", type=float, default=10.0)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status")
    commands.add_parser("sessions")
    commands.add_parser("stats")
    depth = commands.add_parser("depth").add_subparsers(dest="action", required=True)
    get = depth.add_parser("get")
    get.add_argument("--pair", default="")
    put = depth.add_parser("set")
    put.add_argument("policy", help="goodput | heuristic | fixed:K (parameters: goodput:k_max=8,smoothing=0.3)")
    put.add_argument("--pair", default="", help="one pair; without it, the default for all pairs")
    for name in ("drain", "undrain", "deregister"):
        commands.add_parser(name).add_argument("worker")
    commands.choices["drain"].add_argument(
        "--migrate", action="store_true",
        help="also move the worker's sessions in flight to other workers at their next round (each reopens there "
        "with its prompt and committed tokens) instead of letting them finish here",
    )
    register = commands.add_parser("register")
    register.add_argument("role", choices=sorted(ROLES))
    register.add_argument("address")
    register.add_argument("--name", default="")
    # The common flags also after the command (`specctl status --json`); SUPPRESS keeps a value given before it.
    for command in [*commands.choices.values(), get, put]:
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        command.add_argument("--address", default=argparse.SUPPRESS, help="coordinator host:port")
        command.add_argument("--timeout", type=float, default=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace, stub: admin_pb2_grpc.AdminServiceStub) -> tuple[Message, str]:
    options = {"timeout": args.timeout, "metadata": Security.from_env(ADMIN).call_metadata()}
    if args.command == "status":
        reply = stub.GetStatus(admin_pb2.GetStatusRequest(), **options)
        return reply, show_status(reply)
    if args.command == "sessions":
        reply = stub.ListSessions(admin_pb2.ListSessionsRequest(), **options)
        return reply, show_sessions(reply)
    if args.command == "stats":
        reply = stub.GetStats(admin_pb2.GetStatsRequest(), **options)
        return reply, show_stats(reply)
    if args.command == "depth":
        if args.action == "get":
            reply = stub.GetDepthPolicy(admin_pb2.GetDepthPolicyRequest(pair_id=args.pair), **options)
        else:
            reply = stub.SetDepthPolicy(admin_pb2.SetDepthPolicyRequest(pair_id=args.pair, policy=args.policy), **options)
        return reply, show_policies(reply)
    if args.command in ("drain", "undrain"):
        method = stub.Drain if args.command == "drain" else stub.Undrain
        reply = method(admin_pb2.DrainRequest(worker=args.worker, migrate=getattr(args, "migrate", False)), **options)
        state = "accepting sessions"
        if reply.draining:
            state = "draining, its sessions moving away" if reply.migrating else "draining (no new sessions)"
        return reply, f"{reply.name}: {state}"
    if args.command == "deregister":
        reply = stub.DeregisterWorker(admin_pb2.DeregisterWorkerRequest(worker=args.worker), **options)
        return reply, f"deregistered {reply.name} ({reply.address})"
    reply = stub.RegisterWorker(
        admin_pb2.RegisterWorkerRequest(role=ROLES[args.role], address=args.address, name=args.name), **options
    )
    return reply, f"registered {reply.name} at {reply.address} ({'healthy' if reply.healthy else 'not healthy yet'})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Security.from_env(ADMIN).channel(args.address) as channel:
        try:
            reply, text = run(args, admin_pb2_grpc.AdminServiceStub(channel))
        except grpc.RpcError as error:
            print(f"specctl: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json.dumps(to_plain(reply), indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
