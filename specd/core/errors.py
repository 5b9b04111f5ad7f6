"""Domain errors, each named by the gRPC status it maps to.

Plain Python code raises these; servicers translate them into that status (specd.rpc.host)
with a message a person understands. A user's mistake never surfaces as INTERNAL. `code` is
the status's name, so this module needs no gRPC.
"""

from __future__ import annotations


class SpecdError(Exception):
    code: str = "INTERNAL"

    def __init__(self, message: str = "", *, retry_after_seconds: float | None = None):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds  # a hint for the client (google.rpc.RetryInfo), if any


class InvalidArgument(SpecdError):
    code = "INVALID_ARGUMENT"


class OutOfRange(SpecdError):
    code = "OUT_OF_RANGE"


class NotFound(SpecdError):
    code = "NOT_FOUND"


class AlreadyExists(SpecdError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(SpecdError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(SpecdError):
    code = "FAILED_PRECONDITION"


class Unavailable(SpecdError):
    code = "UNAVAILABLE"


class IncompatiblePair(FailedPrecondition):
    """A draft and an oracle that do not share a vocabulary: speculation would be lossy."""
