"""Default ports and names, importable without torch (the admin CLI and clients use them)."""

EMBEDDED_ORACLE = "smollm2-135m-instruct"
ORACLE_PORT = 50051
DRAFT_PORT = 50052
COORDINATOR_PORT = 50050
ORACLE_METRICS_PORT = 9401
DRAFT_METRICS_PORT = 9402
COORDINATOR_METRICS_PORT = 9400


def keep_local_ray_on_loopback() -> None:
    """For a Ray that lives on this machine only (local runs, tests, the rehearsal): Ray otherwise
    swaps 127.0.0.1 for the host's interface address. Must run before `ray` is imported."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
