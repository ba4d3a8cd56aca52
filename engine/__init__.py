"""Optimist inference engine: model, paged KV cache, scheduler, sampler, gRPC server, sidecar and CLI."""
