"""specd: lossless speculative decoding with the draft and the oracle as separate gRPC services."""

__version__ = "0.1.0"
