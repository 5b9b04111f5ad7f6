"""A worker's engine loop: continuous batching of every session's model work.

A job is one session's work on the worker: the oracle's verification of a block or its prefill
of a prompt, a draft's proposal of a block or its open. It is written as a generator that yields
the rows of each forward pass it needs and receives what the pass computed for them; the worker
supplies the function that runs one pass over the rows of several sessions (specd.runtime.batch,
specd.runtime.draft_pass). Each step the loop takes every queued job's next rows, up to a budget,
runs them as one forward pass on the model thread and sends each job its part:

- decode work first (verify blocks, chains and trees, k = 0 steps; a draft's next positions),
  then prefill work (prompt chunks) while rows are left, each in the order it arrived. A prompt
  is prefilled in chunks of `prefill_chunk_tokens`, so a long prompt holds another session's
  round back by one chunk at most (vLLM's chunked prefill). A step with no other rows takes a
  job's rows whatever their number.
- one job per session per step: a session's next job waits for the step after its last one.
- a job that needs several passes (a draft's block of k tokens, a long prompt) stays in the
  step after step, and leaves when it ends (a draft's block: when its stop rule ends it).

A request that arrives while the loop is idle runs at once: there is no batching window. Work
that arrives during a step joins the next one. A job that fails its checks fails alone.

The step's decisions are each session's own: a session's rows are computed as they would be
alone, and decided on by the same code; chunk boundaries depend on the prompt alone. So
batching changes no session's output.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Generator, Sized
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from specd.core.errors import InvalidArgument, SpecdError
from specd.core.memory import release_freed_memory
from specd.core.sampling import SamplingParams
from specd.core.stopping import StopRule
from specd.runtime.batch import Segment
from specd.runtime.draft_pass import DraftOutput, DraftRows
from specd.runtime.drafter import Drafter, DraftProposal
from specd.runtime.executor import ModelExecutor
from specd.runtime.verifier import Verifier, VerifyResult
from specd.runtime.worker import OpenResult, PositionFeatures

# After this long without work following some, the engine hands the memory its passes freed back to the system.
IDLE_TRIM_SECONDS = 2.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """What one step ran: for the worker's metrics and its load report."""

    rows: int
    sessions: int
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
    """The steps of the last `seconds`, for the load report; written on the model thread, read on the event loop.
    Sums are kept as steps come and go, so each read costs the same however many steps the window holds (a draft
    makes a thousand a second)."""

    def __init__(self, seconds: float = 5.0):
        self.seconds = seconds
        self._steps: deque[tuple[float, int, float]] = deque()  # (end time, rows, seconds)
        self._lock = threading.Lock()
        self._rows = self._rows_squared = 0  # sums over the window (integers: exact)
        self._busy = self._rows_busy = 0.0  # sums of seconds and of rows x seconds

    def add(self, rows: int, seconds: float) -> None:
        with self._lock:
            self._steps.append((time.monotonic(), rows, seconds))
            self._count(rows, seconds, 1)
            self._prune()

    def load(self, queued: int) -> Load:
        with self._lock:
            self._prune()
            n, rows, busy = len(self._steps), self._rows, self._busy
        if not n:
            return Load(queued, 0.0, 0.0, 0.0)
        return Load(
            queued=queued, rows_per_step=rows / n, step_seconds=busy / n, busy_fraction=min(1.0, busy / self.seconds),
        )

    def row_seconds(self) -> float:
        """What one more row adds to a pass: the slope of step seconds against rows over the recent steps
        (least squares; 0 while the rows have not varied)."""
        with self._lock:
            self._prune()
            n, rows, squared, busy, rows_busy = len(self._steps), self._rows, self._rows_squared, self._busy, self._rows_busy
        if n < 2:
            return 0.0
        var = squared * n - rows * rows  # n^2 times the variance of rows
        if var <= 0:
            return 0.0
        return max(0.0, (rows_busy * n - rows * busy) / var)

    def _count(self, rows: int, seconds: float, sign: int) -> None:
        self._rows += sign * rows
        self._rows_squared += sign * rows * rows
        self._busy += sign * seconds
        self._rows_busy += sign * rows * seconds

    def _prune(self) -> None:
        horizon = time.monotonic() - self.seconds
        while self._steps and self._steps[0][0] < horizon:
            _, rows, seconds = self._steps.popleft()
            self._count(rows, seconds, -1)
        if not self._steps:
            self._busy = self._rows_busy = 0.0  # no rounding left behind


R = TypeVar("R", bound=Sized)  # the rows of one session in a pass
Out = TypeVar("Out")  # what the pass computed for them


@dataclass
class _Job:
    session_id: str
    start: Callable[[], Generator]  # makes the job's work; called on the model thread at its first step
    future: asyncio.Future
    prefill: bool  # prompt work, after decode work in a step
    queued: float = field(default_factory=time.perf_counter)
    work: Generator | None = None
    rows: Any = None  # the rows its next pass needs
    started: bool = False
    result: Any = None
    error: BaseException | None = None
    finished: bool = False
    step_sessions: int = 1  # sessions in the pass that finished it
    row_seconds: float = 0.0  # what one more row added to a pass then

    def close(self) -> None:
        """Stop the work where it is (a prefill gives up its reservation)."""
        if self.work is not None:
            self.work.close()
        self.finished = True


class Engine(Generic[R, Out]):
    def __init__(
        self,
        forward: Callable[[list[R]], list[Out]],
        executor: ModelExecutor,
        *,
        max_batch_rows: int = 256,
        prefill_chunk_tokens: int = 64,
        batching: bool = True,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        """forward: one pass over the rows of several sessions. batching=False runs one job per step (the
        comparison without continuous batching)."""
        self.forward = forward
        self.executor = executor
        self.max_batch_rows = max_batch_rows
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.batching = batching
        self.on_step = on_step
        self._queue: deque[_Job] = deque()
        self.window = StepWindow()
        self._wake = asyncio.Event()
        self._arrived = threading.Event()  # work was queued since the model thread took its jobs
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def load(self) -> Load:
        return self.window.load(self.queued)

    def submit(self, session_id: str, start: Callable[[], Generator], *, prefill: bool = False) -> _Job:
        """Queue a session's work; its job's future ends with it (cancelling the future drops the work)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())
        job = _Job(session_id, start, asyncio.get_running_loop().create_future(), prefill)
        self._queue.append(job)
        self._arrived.set()
        self._wake.set()
        return job

    async def run(self, session_id: str, start: Callable[[], Generator], *, prefill: bool = False) -> _Job:
        """Queue a session's work; returns its finished job (its result in .result)."""
        job = self.submit(session_id, start, prefill=prefill)
        await job.future
        return job

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for job in self._queue:
            await self.executor.run(job.close)
            if not job.future.done():
                job.future.cancel()
        self._queue.clear()

    async def _loop(self) -> None:
        worked = False  # since the heap was last trimmed
        while True:
            if worked:
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_TRIM_SECONDS)
                except asyncio.TimeoutError:  # idle a while after work: hand back what the passes freed
                    worked = False
                    await self.executor.run(release_freed_memory)
                    continue
            else:
                await self._wake.wait()
            self._wake.clear()
            while self._queue:
                worked = True
                self._arrived.clear()
                jobs = list(self._queue)
                try:
                    await self.executor.run(self._steps, jobs)
                except Exception as error:  # the pass itself failed: every job in it fails
                    log.exception("engine step failed")
                    for job in jobs:
                        if job.started and not job.finished:
                            job.close()
                            job.error = error
                for job in jobs:
                    if job.finished:
                        self._queue.remove(job)
                        if not job.future.done():
                            if job.error is not None:
                                job.future.set_exception(job.error)
                            else:
                                job.future.set_result(job)

    # -- the steps, on the model thread -----------------------------------------------------------
    def _steps(self, jobs: list[_Job]) -> None:
        """Steps over these jobs until one of them finishes or new work arrives: then the event loop answers
        the finished and takes the new (a draft's block of k positions is k steps, without a thread hop each)."""
        while self._step(jobs) and not self._arrived.is_set():
            if any(job.finished or job.future.cancelled() for job in jobs):
                return

    def _step(self, jobs: list[_Job]) -> bool:
        """Take every eligible job's next rows while they fit, run them as one pass, and send each its part;
        returns whether it ran a pass."""
        started = time.perf_counter()
        sessions: set[str] = set()
        eligible = []
        for job in jobs:  # a session's next job waits for the step after the one before it
            if job.session_id not in sessions:
                sessions.add(job.session_id)
                eligible.append(job)
        chosen: list[_Job] = []
        rows = 0
        waits: list[float] = []
        for job in sorted(eligible, key=lambda job: job.prefill):  # stable: arrival order within each kind
            if chosen and not self.batching:
                break
            if job.future.cancelled():  # its caller is gone: drop it before it costs a row
                job.close()
                continue
            if not job.started:
                job.started = True
                waits.append(started - job.queued)
                job.work = job.start()
                if not self._advance(job, None):
                    continue
            if rows and rows + len(job.rows) > self.max_batch_rows:
                continue
            chosen.append(job)
            rows += len(job.rows)
        if not chosen:
            return False
        outputs = self.forward([job.rows for job in chosen])
        row_seconds = self.window.row_seconds()
        prefill_rows = sum(len(job.rows) for job in chosen if job.prefill)
        for job, output in zip(chosen, outputs):
            job.step_sessions, job.row_seconds = len(chosen), row_seconds
            self._advance(job, output)
        stats = StepStats(
            rows=rows, sessions=len(chosen), prefill_rows=prefill_rows, seconds=time.perf_counter() - started,
            queue_seconds=waits,
        )
        self.window.add(stats.rows, stats.seconds)
        if self.on_step is not None:
            self.on_step(stats)
        return True

    @staticmethod
    def _advance(job: _Job, output: Any) -> bool:
        """Send the job its pass's output (None: start it); returns whether it needs another pass."""
        assert job.work is not None
        try:
            job.rows = job.work.send(output)
            return True
        except StopIteration as done:
            job.result = done.value
        except SpecdError as error:  # a caller's mistake fails its own job only
            job.error = error
        except Exception as error:
            log.exception("session %s failed", job.session_id)
            job.error = error
        job.finished = True
        return False


class OracleEngine(Engine[Segment, Any]):
    """The oracle's jobs: verify a block in one pass; open a session, its prompt chunk by chunk."""

    def __init__(self, verifier: Verifier, executor: ModelExecutor, **settings: Any):
        super().__init__(verifier.forward, executor, **settings)
        self.verifier = verifier

    async def verify(
        self, session_id: str, draft_tokens: list[int], distributions: list[tuple[list[int], list[float]]],
        committed_length: int, parents: list[int] | None = None,
    ) -> VerifyResult:
        job = await self.run(
            session_id, lambda: self._verify(session_id, draft_tokens, distributions, committed_length, parents)
        )
        return replace(job.result, step_sessions=job.step_sessions, row_seconds=job.row_seconds)

    async def open(
        self, session_id: str, prompt: list[int], params: SamplingParams, *, return_features: bool = False,
        cache_namespace: str = "", feature_layers: tuple[int, ...] = (),
    ) -> OpenResult:
        """Open a session, its prompt chunk by chunk; with return_features, the hidden states `feature_layers`
        (empty: the final ones) of its positions come back."""
        job = await self.run(
            session_id,
            lambda: self._open(session_id, prompt, params, return_features, cache_namespace, feature_layers),
            prefill=True,
        )
        return job.result

    async def decode(
        self, session_id: str, committed_length: int, max_tokens: int, stop_tokens: Collection[int] = (),
    ) -> AsyncIterator[VerifyResult]:
        """A run of up to max_tokens oracle-alone rounds (k = 0), ending after a stop token: each round's result
        as it is committed. The run is one job, stepped on the model thread with every other session's work and
        without a hop to the event loop per token. Leaving the iteration early drops the rest of the run."""
        if max_tokens < 1:
            raise InvalidArgument(f"a decode run needs max_tokens >= 1, got {max_tokens}")
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[VerifyResult] = asyncio.Queue()
        job: _Job | None = None

        def emit(result: VerifyResult) -> None:  # on the model thread, as each round commits
            assert job is not None
            result = replace(result, step_sessions=job.step_sessions, row_seconds=job.row_seconds)
            loop.call_soon_threadsafe(results.put_nowait, result)

        job = self.submit(
            session_id, lambda: self._decode(session_id, committed_length, max_tokens, frozenset(stop_tokens), emit)
        )
        taken: asyncio.Future[VerifyResult] | None = None
        try:
            while True:
                taken = asyncio.ensure_future(results.get())
                await asyncio.wait((taken, job.future), return_when=asyncio.FIRST_COMPLETED)
                if not taken.done():  # the run ended: what it committed last may still be queued
                    while not results.empty():
                        yield results.get_nowait()
                    job.future.result()  # raises the run's error, if it failed
                    return
                yield taken.result()
        finally:
            if taken is not None and not taken.done():
                taken.cancel()
            if not job.future.done():
                job.future.cancel()

    def _decode(
        self, session_id: str, committed_length: int, max_tokens: int, stop_tokens: frozenset[int],
        emit: Callable[[VerifyResult], None],
    ) -> Generator[Segment, Any, None]:
        for _ in range(max_tokens):
            result = yield from self._verify(session_id, [], [], committed_length)
            emit(result)
            committed_length = result.committed_length
            if result.verdict.next_token in stop_tokens:
                return

    def _verify(self, *args: Any) -> Generator[Segment, Any, VerifyResult]:
        plan = self.verifier.plan_verify(*args)
        hidden = yield plan.segment
        return self.verifier.finish_verify(plan, hidden)

    def _open(
        self, session_id: str, prompt: list[int], params: SamplingParams, return_features: bool, cache_namespace: str,
        feature_layers: tuple[int, ...],
    ) -> Generator[Segment, Any, OpenResult]:
        verifier = self.verifier
        prefill = verifier.begin_open(
            session_id, prompt, params, return_features=return_features, cache_namespace=cache_namespace,
            feature_layers=feature_layers,
        )
        try:
            while not prefill.finished:
                tokens, positions = prefill.next_chunk(self.prefill_chunk_tokens)
                segment = Segment(prefill.kv.cache, tokens, positions, feature_layers=prefill.feature_layers)
                verifier.prefilled(prefill, segment, (yield segment))
        except BaseException:
            verifier.abandon_open(prefill)
            raise
        return verifier.finish_open(prefill)


class DraftEngine(Engine[DraftRows, DraftOutput]):
    """The draft's jobs: propose a block, a pass per position (or per tree level); open a session."""

    def __init__(self, drafter: Drafter, executor: ModelExecutor, **settings: Any):
        super().__init__(drafter.forward, executor, **settings)
        self.drafter = drafter

    async def propose(
        self, session_id: str, append: list[int], committed_length: int, k: int,
        features: PositionFeatures | None = None, stop: StopRule | None = None, tree_width: int = 0,
    ) -> DraftProposal:
        job = await self.run(
            session_id,
            lambda: self.drafter.propose_work(session_id, append, committed_length, k, features, stop, tree_width),
        )
        return job.result

    async def open(
        self, session_id: str, prompt: list[int], params: SamplingParams, *, features: PositionFeatures | None = None,
        cache_namespace: str = "",
    ) -> OpenResult:
        job = await self.run(
            session_id,
            lambda: self.drafter.open_work(
                session_id, prompt, params, features=features, chunk=self.prefill_chunk_tokens,
                cache_namespace=cache_namespace,
            ),
            prefill=True,
        )
        return job.result
