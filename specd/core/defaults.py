"""Default ports and names, importable without torch (the admin CLI and clients use them)."""

EMBEDDED_ORACLE = "smollm2-135m-instruct"
# Drafts for the embedded oracle shipped inside the package (specd/data/drafts/<name>), usable by
# name wherever a model source is expected. The default reads the oracle's features; the
# standalone one reads tokens alone.
DEFAULT_DRAFT = "smollm2-135m-feature-draft"
STANDALONE_DRAFT = "smollm2-135m-draft"
SHIPPED_DRAFTS = (DEFAULT_DRAFT, STANDALONE_DRAFT)
ORACLE_PORT = 50051
DRAFT_PORT = 50052
COORDINATOR_PORT = 50050
ORACLE_METRICS_PORT = 9401
DRAFT_METRICS_PORT = 9402
COORDINATOR_METRICS_PORT = 9400
COORDINATOR_HTTP_PORT = 8000  # the OpenAI-compatible HTTP API in deployments (off unless asked for)


def keep_local_ray_on_loopback() -> None:
    """For a Ray that lives on this machine only (local runs, tests, the rehearsal): Ray otherwise
    swaps 127.0.0.1 for the host's interface address. Must run before `ray` is imported."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# Model workers share cores with each other (a draft next to its oracle). OpenMP threads that
# spin-wait long after each call take those cores from the worker that is busy, and threads that
# never spin pay a wake-up on each of a forward pass's several hundred small ops instead. A short
# spin (about a millisecond) covers the gaps between ops within a pass and lets threads sleep soon
# after it (measured: docs/design.md, "One OpenMP team per process").
IDLE_THREADS_ENV = {"GOMP_SPINCOUNT": "10000"}


def quiet_idle_threads() -> None:
    """Must run before torch is imported (OpenMP reads it once, at load)."""
    import os

    for key, value in IDLE_THREADS_ENV.items():
        os.environ.setdefault(key, value)
