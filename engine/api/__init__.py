"""Generated gRPC stubs for proto/optimist/v1/engine.proto (regenerate with scripts/gen-proto)."""
