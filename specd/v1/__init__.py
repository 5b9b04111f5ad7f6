"""Generated protobuf and gRPC stubs for the `specd.v1` package (build output of `make protos`)."""
