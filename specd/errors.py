"""Domain errors with the gRPC status each maps to.

Plain Python code raises these; servicers translate them into a status with a message a
person understands. A user's mistake never surfaces as INTERNAL.
"""

from __future__ import annotations

import grpc


class SpecdError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SpecdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(SpecdError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(SpecdError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SpecdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(SpecdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(SpecdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(SpecdError):
    code = grpc.StatusCode.UNAVAILABLE


class IncompatiblePair(FailedPrecondition):
    """A draft and an oracle that do not share a vocabulary: speculation would be lossy."""
