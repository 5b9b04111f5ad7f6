"""Prometheus metrics, named like vLLM's under the `specd_` prefix.

Each server owns a registry (several servers may share a process in tests and local runs)
and exposes it on its own HTTP port.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEPTH_BUCKETS = tuple(float(k) for k in range(0, 17))
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SESSION_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> int:
    """Start the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class SpecDecodeCounters:
    """The speculative-decoding counters, recorded per verification round."""

    def __init__(self, registry: CollectorRegistry, labels: tuple[str, ...], *, lookup: bool = False):
        """lookup: also count prompt-lookup tokens (the coordinator knows them; an oracle does not)."""
        self.drafts = Counter("specd_spec_decode_num_drafts", "Rounds that verified a draft block.", labels, registry=registry)
        self.draft_tokens = Counter(
            "specd_spec_decode_num_draft_tokens", "Draft tokens proposed.", labels, registry=registry
        )
        self.accepted_tokens = Counter(
            "specd_spec_decode_num_accepted_tokens", "Draft tokens the oracle accepted.", labels, registry=registry
        )
        self.accepted_per_pos = Counter(
            "specd_spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position in the block (0 = first).",
            (*labels, "position"),
            registry=registry,
        )
        self.lookup_tokens = self.lookup_accepted_tokens = None
        if lookup:
            self.lookup_tokens = Counter(
                "specd_spec_decode_num_lookup_tokens", "Draft tokens proposed by prompt lookup.", labels,
                registry=registry,
            )
            self.lookup_accepted_tokens = Counter(
                "specd_spec_decode_num_lookup_accepted_tokens", "Prompt-lookup draft tokens the oracle accepted.",
                labels, registry=registry,
            )

    def record(
        self, k: int, accepted: int, *label_values: str, lookup_drafted: int = 0, lookup_accepted: int = 0
    ) -> None:
        if k == 0:
            return
        labelled = (lambda metric: metric.labels(*label_values)) if label_values else (lambda metric: metric)
        labelled(self.drafts).inc()
        labelled(self.draft_tokens).inc(k)
        labelled(self.accepted_tokens).inc(accepted)
        if lookup_drafted and self.lookup_tokens is not None and self.lookup_accepted_tokens is not None:
            labelled(self.lookup_tokens).inc(lookup_drafted)
            labelled(self.lookup_accepted_tokens).inc(lookup_accepted)
        for position in range(accepted):
            self.accepted_per_pos.labels(*label_values, str(position)).inc()


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.spec = SpecDecodeCounters(r, ("pair",), lookup=True)
        self.ttft = Histogram(
            "specd_time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "specd_inter_token_latency_seconds", "Time between output tokens.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "specd_e2e_request_latency_seconds", "Request latency end to end.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("specd_num_requests_running", "Requests generating now.", registry=r)
        self.waiting = Gauge("specd_num_requests_waiting", "Requests waiting for a session slot.", registry=r)
        self.depth = Gauge("specd_spec_decode_depth", "The depth k chosen for the latest round.", ("pair",), registry=r)
        self.depth_chosen = Histogram(
            "specd_spec_decode_depth_chosen", "Depth k chosen per round.", ("pair",), buckets=DEPTH_BUCKETS, registry=r
        )
        self.requests = Counter(
            "specd_request_success", "Finished requests by finish reason.", ("finished_reason",), registry=r
        )
        self.failures = Counter("specd_request_failure", "Failed requests by status code.", ("code",), registry=r)
        self.tenant_requests = Counter(
            "specd_tenant_requests", "Finished requests by tenant (the name of the client credential) and reason.",
            ("tenant", "finished"), registry=r,
        )
        self.migrations = Counter(
            "specd_request_migrations", "Sessions moved to another oracle after theirs failed.", registry=r
        )
        self.generation_tokens = Counter("specd_generation_tokens", "Output tokens.", registry=r)
        self.prompt_tokens = Counter("specd_prompt_tokens", "Prompt tokens.", registry=r)


class WorkerMetrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = role
        self.running = Gauge("specd_num_requests_running", "Sessions held by this worker.", registry=r)
        self.forward = Histogram(
            "specd_worker_step_seconds", "Model time per call (a draft block or a verification).",
            ("call",), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.evicted = Counter("specd_sessions_evicted", "Sessions evicted after idling past the TTL.", registry=r)
        self.prompt_tokens = Counter(
            "specd_prompt_positions", "Prompt positions at session open: prefilled, or reused from the prefix cache.",
            ("source",), registry=r,
        )
        self.spec = SpecDecodeCounters(r, ()) if role == "oracle" else None
        # Continuous batching (the engine, specd.runtime.engine).
        self.queued = Gauge("specd_engine_queued", "Jobs (verify blocks, draft blocks, prompt opens) waiting for or in a step.", registry=r)
        self.step_rows = Histogram(
            "specd_engine_rows_per_step", "Rows (tokens) in one forward pass, all sessions together.",
            buckets=ROW_BUCKETS, registry=r,
        )
        self.step_sessions = Histogram(
            "specd_engine_sessions_per_step", "Sessions in one forward pass.", buckets=SESSION_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "specd_engine_step_seconds", "Time of one engine step (its forward pass and decisions).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "specd_engine_queue_seconds", "Time a job waited before its first step.",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def record_step(self, step: Any) -> None:
        """An engine step's StepStats (called on the model thread; the metrics are thread-safe)."""
        self.step_rows.observe(step.rows)
        self.step_sessions.observe(step.sessions)
        self.step_seconds.observe(step.seconds)
        for wait in step.queue_seconds:
            self.queue_seconds.observe(wait)
