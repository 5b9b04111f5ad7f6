"""`specd chaos`: a fault-injection run anyone can repeat.

Two oracles and two drafts run as separate processes behind one coordinator (in this process, on
a local Ray of its own). N clients stream greedy requests for the whole run, and every few
seconds one worker (of its role, one holding a session that is generating at that moment) is killed
(SIGKILL, then started again), paused (SIGSTOP for a few seconds, then SIGCONT) or restarted
(SIGTERM, then started again), while at least one worker of each role keeps answering. Every output is checked against the oracle's own greedy output for its prompt
(the same request through the coordinator with no draft and no fault, before the faults begin).
Processes are only ever signalled by the pid this run started them with, and traffic goes to
loopback only.

The report: requests, completed, migrated (sessions moved to another oracle), failed, tokens
lost or wrong, p99 latency of requests that met a fault and of those that did not, and each
process's memory (resident set) after the warm-up and at the end. Goals, PASS/FAIL: no request
failed, no token lost or wrong, memory growth under 10% for every process that lived through
the run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from specd.cluster.procs import WorkerProcess, spawn

log = logging.getLogger(__name__)

MEMORY_GROWTH_GOAL = 0.10
# The faults in turn (the seed picks where the cycle starts and which worker of the role): a short run meets
# each kind on each role.
FAULT_CYCLE = (
    ("oracle", "kill"), ("draft", "pause"), ("oracle", "pause"), ("draft", "kill"), ("oracle", "restart"),
    ("draft", "restart"),
)
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a hash map works.",
    "List three uses of copper.",
    "What is the capital of France, and why is it famous?",
    "Describe a sunrise in the mountains.",
    "Give a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story.",
]


@dataclass
class ChaosSettings:
    oracle: str
    draft: str
    clients: int = 16
    seconds: float = 600.0
    fault_every: float = 20.0
    pause_seconds: float = 4.0
    max_tokens: int = 64
    seed: int = 0
    torch_threads: int = 1


@dataclass
class Outcome:
    prompt: int
    started: float
    ended: float
    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    migrations: int = 0
    error: str = ""


@dataclass
class Fault:
    kind: str  # kill, pause or restart
    worker: str
    started: float
    ended: float = 0.0


@dataclass
class ChaosReport:
    requests: int
    completed: int
    migrated: int
    failed: int
    tokens_lost: int
    tokens_wrong: int
    p99_with_faults_ms: float | None
    p99_without_faults_ms: float | None
    faults: list[Fault]
    memory: dict[str, tuple[float, float]]  # process -> (MB after warm-up, MB at the end), for those alive throughout
    errors: list[str]

    def goals(self) -> list[tuple[str, str, bool]]:
        growth = {name: end / start - 1 for name, (start, end) in self.memory.items() if start}
        worst = max(growth.values(), default=0.0)
        return [
            ("no request failed", f"{self.failed} failed of {self.requests}", self.failed == 0),
            ("no token lost or wrong", f"{self.tokens_lost} lost, {self.tokens_wrong} wrong",
             self.tokens_lost == 0 and self.tokens_wrong == 0),
            (f"memory growth under {MEMORY_GROWTH_GOAL:.0%} after warm-up",
             f"largest {worst:+.1%} ({max(growth, key=growth.get) if growth else 'none'})", worst < MEMORY_GROWTH_GOAL),
        ]

    def render(self) -> str:
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.0f} ms"

        kinds = {kind: sum(f.kind == kind for f in self.faults) for kind in ("kill", "pause", "restart")}
        lines = [
            f"requests {self.requests}, completed {self.completed}, migrated {self.migrated}, failed {self.failed}",
            f"tokens lost {self.tokens_lost}, wrong {self.tokens_wrong}",
            f"faults: {kinds['kill']} kills, {kinds['pause']} pauses, {kinds['restart']} restarts",
            f"p99 latency: {ms(self.p99_with_faults_ms)} for requests that met a fault, "
            f"{ms(self.p99_without_faults_ms)} for the others",
            "memory (resident, MB) after warm-up -> at the end:",
            *(f"  {name}: {start:.0f} -> {end:.0f}" for name, (start, end) in sorted(self.memory.items())),
        ]
        lines += [f"error: {error}" for error in self.errors[:10]]
        lines += [f"{'PASS' if ok else 'FAIL'}  {goal}: {measured}" for goal, measured, ok in self.goals()]
        return "\n".join(lines)


def resident_mb(pid: int) -> float:
    """A process's resident set size in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def p99_ms(seconds: list[float]) -> float | None:
    """The 99th percentile in ms (as numpy interpolates it, like the benchmark), or None for no values."""
    return float(np.percentile(seconds, 99)) * 1000 if seconds else None


class Chaos:
    def __init__(self, settings: ChaosSettings):
        self.settings = settings
        self.random = random.Random(settings.seed)
        self.workers: dict[str, WorkerProcess] = {}  # registered name -> process
        self.paused: set[str] = set()
        self.faults: list[Fault] = []
        self.outcomes: list[Outcome] = []
        self.in_flight: dict[str, Outcome] = {}  # request id -> the outcome of a request still streaming
        self.running = None
        self.born: dict[str, float] = {}  # name -> when its process started
        self._own_ray = False  # whether this run started Ray (and stops it)
        self.processes: list[WorkerProcess] = []  # every process this run started, to stop them all at the end

    def _options(self, role: str) -> dict[str, object]:
        model = self.settings.oracle if role == "oracle" else self.settings.draft
        return {"model": model, "port": 0, "torch_threads": self.settings.torch_threads, "grace_seconds": 1}

    async def _spawn(self, role: str) -> WorkerProcess:
        worker = await asyncio.to_thread(spawn, role, self._options(role))
        self.processes.append(worker)
        return worker

    async def _register(self, role: str, worker: WorkerProcess) -> str:
        from specd.v1 import common_pb2

        kind = common_pb2.WORKER_ROLE_ORACLE if role == "oracle" else common_pb2.WORKER_ROLE_DRAFT
        status = await self.running.plane.call("register", kind, worker.address)
        self.workers[status["name"]] = worker
        self.born[status["name"]] = time.monotonic()
        return status["name"]

    async def start(self) -> None:
        import ray

        from coordinator.config import CoordinatorConfig
        from coordinator.control_plane.client import connect_ray
        from coordinator.server import start_coordinator

        spawned = await asyncio.gather(
            *(self._spawn(role) for role in ("oracle", "oracle", "draft", "draft")), return_exceptions=True
        )
        for result in spawned:
            if isinstance(result, BaseException):
                raise result
        self._own_ray = not ray.is_initialized()
        connect_ray("", f"specd-chaos-{os.getpid()}")
        self.running = await start_coordinator(CoordinatorConfig(
            port=0, metrics_port=-1, oracles=[], drafts=[], health_interval_seconds=0.5, report_interval_seconds=0.5,
            plane_name=f"chaos-{os.getpid()}", max_concurrent_sessions=max(64, self.settings.clients),
        ))
        for role, worker in zip(("oracle", "oracle", "draft", "draft"), spawned):
            await self._register(role, worker)

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
        for worker in self.processes:
            if worker.process.poll() is None:
                os.kill(worker.process.pid, signal.SIGCONT)  # a paused one must be able to stop
                await asyncio.to_thread(worker.stop, 5.0)
        import ray

        if self._own_ray and ray.is_initialized():
            ray.shutdown()

    # -- traffic ----------------------------------------------------------------------------------
    async def references(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's greedy output from the oracle alone, before any fault."""
        from specd.client import AsyncSpecdClient

        async with AsyncSpecdClient(self.running.address) as client:
            return [
                list((await client.generate(prompt, max_tokens=self.settings.max_tokens, depth=0, stop_at_eos=False)).token_ids)
                for prompt in prompts
            ]

    async def client(self, index: int, prompts: list[str], until: float) -> None:
        from specd.client import AsyncSpecdClient

        async with AsyncSpecdClient(self.running.address) as client:
            n = index
            while time.monotonic() < until:
                prompt = n % len(prompts)
                n += self.settings.clients
                outcome = Outcome(prompt, time.monotonic(), 0.0, request_id=f"chaos-{n}")
                self.in_flight[outcome.request_id] = outcome
                try:
                    async for chunk in client.stream(
                        prompts[prompt], max_tokens=self.settings.max_tokens, stop_at_eos=False, timeout=120.0,
                        request_id=outcome.request_id,
                    ):
                        outcome.tokens += list(chunk.token_ids)
                        if chunk.stats is not None:
                            outcome.migrations = chunk.stats.migrations
                except grpc.aio.AioRpcError as error:
                    outcome.error = f"{error.code().name}: {error.details()}"
                except Exception as error:
                    outcome.error = f"{type(error).__name__}: {error}"
                outcome.ended = time.monotonic()
                del self.in_flight[outcome.request_id]
                self.outcomes.append(outcome)

    # -- faults -----------------------------------------------------------------------------------
    def _alive(self, role: str) -> list[str]:
        return [
            name for name, w in self.workers.items()
            if w.role == role and w.process.poll() is None and name not in self.paused
        ]

    def _generating(self, request_id: str) -> bool:
        """Whether a request has had its first tokens and not its last: its session is past its open and before its
        close, where a fault must move it rather than merely place it elsewhere."""
        outcome = self.in_flight.get(request_id)
        return outcome is not None and 0 < len(outcome.tokens) < self.settings.max_tokens

    async def _target(self, role: str) -> str:
        """A live worker of `role` that holds a session generating now, the one holding most such sessions (the seed
        breaks ties), so that a fault meets sessions in flight rather than an idle worker or one only opening or
        closing them. It looks for up to two seconds; then the one holding the most sessions of any kind."""
        alive = self._alive(role)
        for _ in range(40):
            held, generating = dict.fromkeys(alive, 0), dict.fromkeys(alive, 0)
            for session in await self.running.plane.call("list_sessions"):
                draft, _, oracle = session["pair_id"].rpartition("+")
                name = oracle if role == "oracle" else draft
                if name in held:
                    held[name] += 1
                    generating[name] += self._generating(session["request_id"])
            if any(generating.values()):
                held = generating
                break
            await asyncio.sleep(0.05)
        most = max(held.values())
        return self.random.choice([name for name in alive if held[name] == most])

    async def faults_until(self, until: float) -> None:
        turn = self.settings.seed
        while True:
            await asyncio.sleep(self.settings.fault_every)
            if time.monotonic() + self.settings.pause_seconds > until:
                return
            role, kind = FAULT_CYCLE[turn % len(FAULT_CYCLE)]
            turn += 1
            if len(self._alive(role)) < 2:  # one of each role keeps answering
                continue
            name = await self._target(role)
            fault = Fault(kind, name, time.monotonic())
            self.faults.append(fault)
            log.warning("chaos: %s %s", kind, name)
            worker = self.workers[name]
            if kind == "pause":
                os.kill(worker.process.pid, signal.SIGSTOP)
                self.paused.add(name)
                await asyncio.sleep(self.settings.pause_seconds)
                os.kill(worker.process.pid, signal.SIGCONT)
                self.paused.discard(name)
            else:
                if kind == "kill":
                    os.kill(worker.process.pid, signal.SIGKILL)
                    await asyncio.to_thread(worker.process.wait)
                else:
                    await asyncio.to_thread(worker.stop, 10.0)
                replacement = await self._spawn(role)
                await self.running.plane.call("deregister", name)
                del self.workers[name]
                await self._register(role, replacement)
            fault.ended = time.monotonic()

    async def run(self) -> ChaosReport:
        await self.start()
        prompts = PROMPTS
        expected = await self.references(prompts)
        warm_until = time.monotonic() + min(10.0, self.settings.seconds / 6)
        await asyncio.gather(*(self.client(i, prompts, warm_until) for i in range(self.settings.clients)))
        self.outcomes.clear()
        warm = {name: resident_mb(w.process.pid) for name, w in self.workers.items()}
        warm["coordinator"] = resident_mb(os.getpid())
        began = time.monotonic()
        until = began + self.settings.seconds
        await asyncio.gather(
            self.faults_until(until), *(self.client(i, prompts, until) for i in range(self.settings.clients))
        )
        end = {name: resident_mb(w.process.pid) for name, w in self.workers.items()}
        end["coordinator"] = resident_mb(os.getpid())
        survivors = {name: (warm[name], end[name]) for name in warm if name in end and self.born.get(name, 0) < began}
        return self._report(expected, survivors)

    def _report(self, expected: list[list[int]], memory: dict[str, tuple[float, float]]) -> ChaosReport:
        lost = wrong = 0
        faulted, calm = [], []
        for outcome in self.outcomes:
            if outcome.error:
                continue
            reference = expected[outcome.prompt]
            wrong += sum(a != b for a, b in zip(outcome.tokens, reference))
            lost += max(0, len(reference) - len(outcome.tokens))
            met = any(f.started <= outcome.ended and (f.ended or outcome.ended) >= outcome.started for f in self.faults)
            (faulted if met else calm).append(outcome.ended - outcome.started)
        failed = [o for o in self.outcomes if o.error]
        return ChaosReport(
            requests=len(self.outcomes), completed=len(self.outcomes) - len(failed),
            migrated=sum(o.migrations > 0 for o in self.outcomes), failed=len(failed), tokens_lost=lost,
            tokens_wrong=wrong, p99_with_faults_ms=p99_ms(faulted), p99_without_faults_ms=p99_ms(calm),
            faults=self.faults, memory=memory, errors=sorted({o.error for o in failed}),
        )


async def run_chaos(settings: ChaosSettings) -> ChaosReport:
    chaos = Chaos(settings)
    try:
        return await chaos.run()
    finally:
        await chaos.stop()


def tiny_pair(directory: Path) -> tuple[str, str]:
    """A tiny random-weight oracle and an identical draft (for a quick run; no download)."""
    from specd.models.tiny import write_tiny_model

    write_tiny_model(directory / "oracle", seed=1, layers=2, hidden=64)
    return str(directory / "oracle"), str(directory / "oracle")


def register(commands: argparse._SubParsersAction) -> None:
    from specd.core.defaults import DEFAULT_DRAFT, EMBEDDED_ORACLE

    parser = commands.add_parser(
        "chaos", help="kill, pause and restart workers under load; check that nothing is lost (loopback only)"
    )
    parser.add_argument("--oracle", default=EMBEDDED_ORACLE, help="the oracles' model source")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="the drafts' model source")
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight models instead (a quick run)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--pause-seconds", type=float, default=4.0, help="how long a paused worker stays stopped")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="chooses the faults")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="specd-chaos-") as tmp:
        oracle, draft = tiny_pair(Path(tmp)) if args.tiny else (args.oracle, args.draft)
        settings = ChaosSettings(
            oracle=oracle, draft=draft, clients=args.clients, seconds=args.minutes * 60, fault_every=args.fault_every,
            pause_seconds=args.pause_seconds, max_tokens=args.max_tokens, seed=args.seed,
        )
        report = asyncio.run(run_chaos(settings))
    print(report.render())
    return 0 if all(ok for _, _, ok in report.goals()) else 1
