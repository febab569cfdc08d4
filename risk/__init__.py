"""Risk engine (no gRPC, no protobuf)."""
