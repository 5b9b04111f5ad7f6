"""The oracle's features on the wire (specd.v1 Features): float16, little-endian, row-major [rows, dim].

A feature draft only conditions on them, so their precision affects acceptance, never the output.
The conversions run on a worker's event loop, so they use numpy rather than torch: a torch op on
a large tensor there would start a second team of OpenMP threads in the process, which slows every
op of the model thread (specd.rpc.launch).
"""

from __future__ import annotations

import numpy as np
import torch

from specd.core.errors import InvalidArgument
from specd.runtime.worker import PositionFeatures
from specd.v1 import common_pb2

WIRE_DTYPE = "<f2"


def features_to_bytes(rows: torch.Tensor) -> bytes:
    """[n, H] float tensor -> the wire format."""
    rows = rows.detach()
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float16):
        rows = rows.to("cpu", torch.float32)
    return np.ascontiguousarray(rows.numpy(), dtype=WIRE_DTYPE).tobytes()


def features_from_bytes(data: bytes, rows: int, dim: int) -> torch.Tensor:
    """The wire format -> [rows, dim] float32 tensor, with a clear error when the sizes disagree."""
    if rows < 0 or dim <= 0 or len(data) != rows * dim * 2:
        raise InvalidArgument(f"features payload of {len(data)} bytes does not hold {rows} rows of width {dim}")
    if not rows:
        return torch.zeros(0, dim)
    return torch.from_numpy(np.frombuffer(data, dtype=WIRE_DTYPE).reshape(rows, dim).astype(np.float32))


def features_to_proto(features: PositionFeatures) -> common_pb2.Features:
    rows = features.rows
    return common_pb2.Features(
        start=features.start, rows=rows.shape[0], dim=rows.shape[1], data=features_to_bytes(rows)
    )


def features_from_proto(message: common_pb2.Features) -> PositionFeatures | None:
    """None when the message is empty (a standalone draft's calls carry no features)."""
    if not message.dim:
        return None
    if message.start < 0:
        raise InvalidArgument(f"features start at a negative position ({message.start})")
    return PositionFeatures(message.start, features_from_bytes(message.data, message.rows, message.dim))
