"""Default ports and names, importable without torch (the admin CLI and clients use them)."""

EMBEDDED_ORACLE = "smollm2-135m-instruct"
ORACLE_PORT = 50051
DRAFT_PORT = 50052
COORDINATOR_PORT = 50050
ORACLE_METRICS_PORT = 9401
DRAFT_METRICS_PORT = 9402
COORDINATOR_METRICS_PORT = 9400
