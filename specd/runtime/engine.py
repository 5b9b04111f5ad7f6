"""The oracle's engine loop: continuous batching of verification and prefill.

Every Verify and every session open is queued here. Each step the loop takes what is queued, up
to a budget of rows, and runs it as one forward pass on the model thread (specd.runtime.batch):
every queued verify block (chains, draft trees, k = 0 steps), then prompt chunks while the
budget lasts, each in the order it arrived. A prompt is prefilled in chunks of
`prefill_chunk_tokens`, so a long prompt holds another session's round back by one chunk at most
(vLLM's chunked prefill). A request that arrives while the loop is idle runs at once: there is
no batching window. Work that arrives during a step joins the next one.

The step's decisions are each session's own: the verifier decides on a session's rows exactly as
it would alone (specd.runtime.verifier), and chunk boundaries depend on the prompt alone, so
batching changes no session's output.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from specd.core.errors import SpecdError
from specd.core.sampling import SamplingParams
from specd.runtime.batch import Segment
from specd.runtime.executor import ModelExecutor
from specd.runtime.verifier import Verifier, VerifyPlan, VerifyResult
from specd.runtime.worker import OpenResult, Prefill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """What one step ran: for the worker's metrics and its load report."""

    rows: int
    sessions: int
    verifies: int
    prefill_rows: int
    seconds: float
    queue_seconds: list[float]  # per job that started in this step: how long it waited


@dataclass(frozen=True)
class Load:
    """The engine's recent load (specd.v1 WorkerLoad)."""

    queued: int
    rows_per_step: float
    step_seconds: float
    busy_fraction: float


class StepWindow:
    """The steps of the last `seconds`, for the load report; written on the model thread, read on the event loop."""

    def __init__(self, seconds: float = 5.0):
        self.seconds = seconds
        self._steps: deque[tuple[float, int, float]] = deque()  # (end time, rows, seconds)
        self._lock = threading.Lock()

    def add(self, rows: int, seconds: float) -> None:
        with self._lock:
            self._steps.append((time.monotonic(), rows, seconds))
            self._prune()

    def load(self, queued: int) -> Load:
        with self._lock:
            self._prune()
            steps = list(self._steps)
        if not steps:
            return Load(queued, 0.0, 0.0, 0.0)
        busy = sum(seconds for _, _, seconds in steps)
        return Load(
            queued=queued, rows_per_step=sum(rows for _, rows, _ in steps) / len(steps),
            step_seconds=busy / len(steps), busy_fraction=min(1.0, busy / self.seconds),
        )

    def row_seconds(self) -> float:
        """What one more row adds to a pass: the slope of step seconds against rows over the recent steps
        (least squares; 0 while the rows have not varied)."""
        with self._lock:
            steps = [(rows, seconds) for _, rows, seconds in self._steps]
        if len(steps) < 2:
            return 0.0
        mean_r = sum(r for r, _ in steps) / len(steps)
        mean_s = sum(s for _, s in steps) / len(steps)
        var = sum((r - mean_r) ** 2 for r, _ in steps)
        if var == 0:
            return 0.0
        return max(0.0, sum((r - mean_r) * (s - mean_s) for r, s in steps) / var)

    def _prune(self) -> None:
        horizon = time.monotonic() - self.seconds
        while self._steps and self._steps[0][0] < horizon:
            self._steps.popleft()


@dataclass
class _Job:
    kind: str  # "verify" or "open"
    args: tuple
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    prefill: Prefill | None = None  # an open's state once it began
    started: bool = False
    result: Any = None
    error: BaseException | None = None
    finished: bool = False


class Engine:
    def __init__(
        self,
        verifier: Verifier,
        executor: ModelExecutor,
        *,
        max_batch_rows: int = 256,
        prefill_chunk_tokens: int = 64,
        batching: bool = True,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        """batching=False runs one job per step (the comparison without continuous batching)."""
        self.verifier = verifier
        self.executor = executor
        self.max_batch_rows = max_batch_rows
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.batching = batching
        self.on_step = on_step
        self._queue: deque[_Job] = deque()
        self.window = StepWindow()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def load(self) -> Load:
        return self.window.load(self.queued)

    async def verify(
        self, session_id: str, draft_tokens: list[int], distributions: list[tuple[list[int], list[float]]],
        committed_length: int, parents: list[int] | None = None,
    ) -> VerifyResult:
        return await self._submit("verify", (session_id, draft_tokens, distributions, committed_length, parents))

    async def open(
        self, session_id: str, prompt: list[int], params: SamplingParams, *, return_features: bool = False
    ) -> OpenResult:
        return await self._submit("open", (session_id, prompt, params, return_features))

    async def _submit(self, kind: str, args: tuple) -> Any:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        job = _Job(kind, args, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake.set()
        return await job.future

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for job in self._queue:
            if job.prefill is not None:
                self.verifier.abandon_open(job.prefill)
            if not job.future.done():
                job.future.cancel()
        self._queue.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                jobs = list(self._queue)
                try:
                    await self.executor.run(self._step, jobs)
                except Exception as error:  # the pass itself failed: every job in it fails
                    log.exception("engine step failed")
                    for job in jobs:
                        if job.started and not job.finished:
                            job.error, job.finished = error, True
                            if job.prefill is not None:
                                self.verifier.abandon_open(job.prefill)
                for job in jobs:
                    if job.finished:
                        self._queue.remove(job)
                        if not job.future.done():
                            if job.error is not None:
                                job.future.set_exception(job.error)
                            else:
                                job.future.set_result(job.result)

    # -- the step, on the model thread ------------------------------------------------------------
    def _step(self, jobs: list[_Job]) -> None:
        """Lay out this step's rows, run them as one pass, and finish what they complete."""
        started = time.perf_counter()
        plans: list[tuple[_Job, VerifyPlan]] = []
        chunks: list[tuple[_Job, Segment]] = []
        rows = 0
        waits: list[float] = []
        sessions: set[str] = set()  # a session's next job waits for the step after this one's
        for job in jobs:
            if rows and not self.batching:
                break
            if job.args[0] in sessions:
                continue
            sessions.add(job.args[0])
            if job.future.cancelled():  # its caller is gone: drop it before it costs a row
                if job.prefill is not None:
                    self.verifier.abandon_open(job.prefill)
                job.finished = True
                continue
            try:
                if job.kind == "verify":
                    if rows and rows + len(job.args[1]) + 1 > self.max_batch_rows:
                        continue
                    plan = self.verifier.plan_verify(*job.args)
                    plans.append((job, plan))
                    rows += len(plan.segment)
                else:
                    segment = self._next_chunk(job, rows)
                    if segment is None:
                        continue
                    chunks.append((job, segment))
                    rows += len(segment)
            except SpecdError as error:  # a caller's mistake fails its own job only
                job.error, job.finished = error, True
                continue
            if not job.started:
                job.started = True
                waits.append(started - job.queued)
        segments = [plan.segment for _, plan in plans] + [segment for _, segment in chunks]
        if not segments:
            return
        hidden = self.verifier.forward(segments)
        row_seconds = self.window.row_seconds()
        for (job, plan), rows_hidden in zip(plans, hidden):
            try:
                job.result = replace(
                    self.verifier.finish_verify(plan, rows_hidden), step_sessions=len(segments), row_seconds=row_seconds
                )
            except SpecdError as error:
                job.error = error
            job.finished = True
        for (job, segment), rows_hidden in zip(chunks, hidden[len(plans) :]):
            assert job.prefill is not None
            self.verifier.prefilled(job.prefill, segment, rows_hidden)
            if job.prefill.finished:
                job.result = self.verifier.finish_open(job.prefill)
                job.finished = True
        stats = StepStats(
            rows=sum(len(s) for s in segments), sessions=len(segments), verifies=len(plans),
            prefill_rows=sum(len(s) for _, s in chunks), seconds=time.perf_counter() - started,
            queue_seconds=waits,
        )
        self.window.add(stats.rows, stats.seconds)
        if self.on_step is not None:
            self.on_step(stats)

    def _next_chunk(self, job: _Job, rows: int) -> Segment | None:
        """The open's next prompt chunk, if it fits the step (a step with no other rows takes one anyway);
        an open whose prompt is all cached finishes here."""
        if job.prefill is None:
            session_id, prompt, params, return_features = job.args
            job.prefill = self.verifier.begin_open(session_id, prompt, params, return_features=return_features)
        prefill = job.prefill
        if prefill.finished:
            job.result, job.finished = self.verifier.finish_open(prefill), True
            return None
        tokens, positions = prefill.next_chunk(self.prefill_chunk_tokens)
        if rows and rows + len(tokens) > self.max_batch_rows:
            return None
        return Segment(prefill.kv.cache, tokens, positions)
