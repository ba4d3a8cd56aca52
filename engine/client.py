"""A small synchronous client for the Engine API (used by `optimist generate`, the demo and the benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .api import engine_pb2 as pb
from .api import engine_pb2_grpc as pb_grpc


def wait_ready(address: str, timeout_s: float) -> None:
    """Blocks until the engine's health service reports optimist.v1.Engine SERVING."""
    import time

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="optimist.v1.Engine"), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine at {address} not ready after {timeout_s:.0f} s")
            time.sleep(0.2)


def build_request(
    prompt: str,
    chat: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> pb.GenerateRequest:
    sampling = pb.SamplingParams()
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if seed is not None:
        sampling.seed = seed
    if chat:
        return pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]), sampling=sampling
        )
    return pb.GenerateRequest(text=prompt, sampling=sampling)


def stream(address: str, request: pb.GenerateRequest, timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        yield from pb_grpc.EngineStub(channel).Generate(request, timeout=timeout_s)
