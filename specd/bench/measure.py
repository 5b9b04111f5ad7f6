"""What one request measured, and how requests are summed up. Pure Python, no models, no gRPC.

Terms (as in specd.core.verification and vLLM's spec-decode metrics):
- output tokens are counted here from the returned token ids (EOS excluded), never taken from
  the server's usage figures;
- tokens per second = output tokens / wall seconds, summed over the requests of a cell;
- acceptance rate = accepted / drafted draft tokens;
- mean acceptance length = 1 + accepted / rounds that drafted (tokens committed per such round,
  the oracle's own recovered or bonus token included);
- k = draft tokens asked for in a round (depth), 0 when the oracle decodes alone.

Streams (vLLM's serving-benchmark conventions): time to first token (TTFT) runs from sending the
request to the first message carrying tokens. A round commits several tokens at once, so a
message may carry a burst of n tokens: each of them gets an inter-token latency (ITL) of
gap / n, where gap is the time since the previous message with tokens. Time per output token
(TPOT) = (end-to-end latency - TTFT) / (tokens - 1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    """One completed request of a single-client section."""

    prompt_id: str
    category: str
    tokens: int
    seconds: float
    finish: str
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    rounds_with_draft: int = 0
    depths: list[int] = field(default_factory=list)  # k of every round
    draft_seconds: float = 0.0  # the draft's compute
    verify_seconds: float = 0.0  # the oracle's compute
    network_seconds: float = 0.0  # worker RPC wall time minus compute (gRPC, queueing, injected delay)
    loop_seconds: float = 0.0  # the session loop's own clock, from the first round to the last token
    same_as_reference: bool | None = None  # temperature 0: equal to transformers' greedy output
    speculative: bool = False  # acceptance figures apply


@dataclass
class Cell:
    """Requests of one configuration summed up (one category, or all of them)."""

    requests: int
    tokens: int
    seconds: float
    tokens_per_second: float
    ratio: float | None = None  # tokens_per_second / the reference configuration's, same category
    acceptance_rate: float | None = None  # None: nothing was drafted
    mean_acceptance_length: float | None = None
    k_mean: float | None = None
    k_mode: int | None = None
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    network_seconds: float = 0.0
    loop_seconds: float = 0.0
    same_as_reference: float | None = None  # share of requests with exactly the reference tokens


def summarise(records: list[RequestRecord]) -> Cell:
    tokens = sum(r.tokens for r in records)
    seconds = sum(r.seconds for r in records)
    cell = Cell(requests=len(records), tokens=tokens, seconds=seconds, tokens_per_second=tokens / seconds if seconds > 0 else 0.0)
    cell.rounds = sum(r.rounds for r in records)
    cell.drafted = sum(r.drafted for r in records)
    cell.accepted = sum(r.accepted for r in records)
    cell.draft_seconds = sum(r.draft_seconds for r in records)
    cell.verify_seconds = sum(r.verify_seconds for r in records)
    cell.network_seconds = sum(r.network_seconds for r in records)
    cell.loop_seconds = sum(r.loop_seconds for r in records)
    if any(r.speculative for r in records):
        rounds_with_draft = sum(r.rounds_with_draft for r in records)
        if cell.drafted:  # undefined when the policy never drafted
            cell.acceptance_rate = cell.accepted / cell.drafted
            cell.mean_acceptance_length = 1.0 + cell.accepted / rounds_with_draft
        depths = [k for r in records for k in r.depths]
        if depths:
            cell.k_mean, cell.k_mode = depth_summary(depths)
    checked = [r.same_as_reference for r in records if r.same_as_reference is not None]
    if checked:
        cell.same_as_reference = sum(checked) / len(checked)
    return cell


def depth_summary(depths: list[int]) -> tuple[float, int]:
    """(mean, mode) of the k chosen per round; the smaller k wins a tie for the mode."""
    counts = Counter(depths)
    mode = min(counts, key=lambda k: (-counts[k], k))
    return sum(depths) / len(depths), mode


def set_ratios(cells: dict[str, Cell], reference: dict[str, Cell]) -> None:
    """Fill in each cell's ratio to the reference cell of the same key (category)."""
    for key, cell in cells.items():
        base = reference.get(key)
        if base is not None and base.tokens_per_second > 0:
            cell.ratio = cell.tokens_per_second / base.tokens_per_second


@dataclass
class StreamRecord:
    """One streamed request: when it was sent, and when each message with tokens arrived."""

    prompt_id: str
    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter time, tokens in the message)
    finished: float = 0.0
    error: str = ""  # empty when the request completed
    depths: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)

    def ttft(self) -> float | None:
        return self.arrivals[0][0] - self.sent if self.arrivals else None

    def inter_token_latencies(self) -> list[float]:
        """gap / n for each of the n tokens of every message after the first."""
        latencies: list[float] = []
        for (previous, _), (now, n) in zip(self.arrivals, self.arrivals[1:]):
            latencies += [(now - previous) / n] * n
        return latencies

    def tpot(self) -> float | None:
        if self.tokens < 2 or not self.arrivals:
            return None
        return (self.arrivals[-1][0] - self.arrivals[0][0]) / (self.tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as numpy), or None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


@dataclass
class StreamSummary:
    requests: int
    failed: int
    tokens: int
    wall_seconds: float  # first request sent to last request finished
    tokens_per_second: float  # aggregate: all output tokens / wall_seconds
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    tpot_p50_ms: float | None
    e2e_p50_ms: float | None
    k_mean: float | None = None
    k_mode: int | None = None
    errors: list[str] = field(default_factory=list)


def summarise_streams(records: list[StreamRecord]) -> StreamSummary:
    done = [r for r in records if not r.error]
    failed = [r for r in records if r.error]
    start = min((r.sent for r in records), default=0.0)
    end = max((r.finished for r in records), default=0.0)
    wall = max(end - start, 0.0)
    tokens = sum(r.tokens for r in done)

    def ms(values: list[float | None], q: float) -> float | None:
        value = percentile([v for v in values if v is not None], q)
        return None if value is None else value * 1000

    itl = [x for r in done for x in r.inter_token_latencies()]
    ttft = [r.ttft() for r in done]
    depths = [k for r in done for k in r.depths]
    k_mean, k_mode = depth_summary(depths) if depths else (None, None)
    return StreamSummary(
        requests=len(records),
        failed=len(failed),
        tokens=tokens,
        wall_seconds=wall,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        ttft_p50_ms=ms(ttft, 50),
        ttft_p99_ms=ms(ttft, 99),
        itl_p50_ms=ms(itl, 50),
        itl_p99_ms=ms(itl, 99),
        tpot_p50_ms=ms([r.tpot() for r in done], 50),
        e2e_p50_ms=ms([r.finished - r.sent for r in done], 50),
        k_mean=k_mean,
        k_mode=k_mode,
        errors=sorted({r.error for r in failed})[:5],
    )
