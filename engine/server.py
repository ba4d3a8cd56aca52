"""The gRPC server: optimist.v1.Engine, grpc.health.v1.Health and server reflection on one port.

The server listens (and answers health checks) before the model has loaded; Generate answers UNAVAILABLE until
the engine is ready. Requests are validated on the event loop, so a bad request never reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import kserve
from .api import engine_pb2 as pb
from .config import EngineConfig
from .engine import Engine, LoadSnapshot, UnknownAdapter
from .metrics import Histogram
from .model.tokenizer import TokenizerError
from .outputs import Chunk, Finished
from .request import FinishReason, InvalidRequest, SamplingParams, StructuredOutput
from .rpc import RequestFailed, malformed, request_events, server_stream, unary
from .sidecar import LoadCollector, SidecarConfig

if TYPE_CHECKING:
    from .openai_api import HttpServer

log = logging.getLogger(__name__)

SERVICE = "optimist.v1.Engine"

_FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}


# ------------------------------------------------------------------------------------ proto conversion


def params_from_proto(s: pb.SamplingParams) -> SamplingParams:
    def opt(name: str, default: Any) -> Any:
        return getattr(s, name) if s.HasField(name) else default

    return SamplingParams(
        temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0),
        top_k=opt("top_k", 0),
        min_p=opt("min_p", 0.0),
        max_tokens=opt("max_tokens", 16),
        min_tokens=opt("min_tokens", 0),
        seed=opt("seed", None),
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=opt("ignore_eos", False),
        repetition_penalty=opt("repetition_penalty", 1.0),
        presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        logprobs=opt("logprobs", None),
        prompt_logprobs=opt("prompt_logprobs", None),
        structured_output=structured_from_proto(s.structured_output) if s.HasField("structured_output") else None,
    )


def structured_from_proto(so: pb.StructuredOutput) -> StructuredOutput:
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest(
            "sampling.structured_output", "set one of json_schema, json_object, regex, choice, grammar"
        )
    whitespace = so.whitespace_pattern if so.HasField("whitespace_pattern") else None
    if kind == "json_object":
        if not so.json_object:
            raise InvalidRequest("sampling.structured_output.json_object", "must be true when set")
        return StructuredOutput("json_object", whitespace=whitespace)
    if kind == "choice":
        return dataclasses.replace(StructuredOutput.choices(list(so.choice.choices)), whitespace=whitespace)
    return StructuredOutput(kind, getattr(so, kind), whitespace=whitespace)


def histogram_to_proto(h: Histogram) -> pb.Histogram:
    return pb.Histogram(upper_bounds=list(h.bounds), cumulative_counts=h.cumulative(), sum=h.sum, count=h.count)


def load_to_proto(snap: LoadSnapshot, model_name: str) -> pb.Load:
    st = snap.stats
    return pb.Load(
        waiting=snap.waiting,
        running=snap.running,
        kv_blocks_used=snap.kv_blocks_used,
        kv_blocks_total=snap.kv_blocks_total,
        evictions_total=snap.evictions_total,
        prompt_tokens_total=st.prompt_tokens,
        generation_tokens_total=st.generation_tokens,
        lower_bound_demand_blocks=snap.lower_bound_demand_blocks,
        finished_total=st.finished,
        time_to_first_token_s=histogram_to_proto(st.ttft),
        inter_token_latency_s=histogram_to_proto(st.itl),
        e2e_latency_s=histogram_to_proto(st.e2e),
        queue_time_s=histogram_to_proto(st.queue),
        ready=snap.ready,
        steps_total=st.steps,
        sparse_prefill_tokens_total=snap.sparse_prefill_tokens,
        prefix_cache_hit_tokens_total=st.prefix_cache_hit_tokens,
        model_name=model_name,
        kv_block_size=snap.kv_block_size,
        spec_drafts_total=st.spec_drafts,
        spec_draft_tokens_total=st.spec_draft_tokens,
        spec_accepted_tokens_total=st.spec_accepted_tokens,
        running_adapters=list(snap.running_adapters),
        waiting_adapters=list(snap.waiting_adapters),
        max_loras=snap.max_loras,
    )


# ---------------------------------------------------------------------------------------------- service


class EngineService:
    def __init__(self) -> None:
        self.engine: Engine | None = None

    async def _ready_engine(self, context: grpc.aio.ServicerContext, request: Any) -> Engine:
        if (reason := malformed(request)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert self.engine is not None
        return self.engine

    def _prompt(self, engine: Engine, request: pb.GenerateRequest) -> tuple[list[int], str]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            return engine.tokenizer.encode(request.text), "prompt.text"
        if kind == "token_ids":
            return list(request.token_ids.ids), "prompt.token_ids"
        if kind == "chat":
            chat = request.chat
            if not chat.messages:
                raise InvalidRequest("prompt.chat.messages", "no messages")
            add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
            messages = [{"role": m.role, "content": m.content} for m in chat.messages]
            try:
                text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add)
            except TokenizerError as exc:
                raise InvalidRequest("prompt.chat", str(exc)) from exc
            return engine.tokenizer.encode(text), "prompt.chat"
        raise InvalidRequest("prompt", "one of text, token_ids or chat is required")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = await self._ready_engine(context, request)
        try:
            adapter = engine.adapter(request.adapter) if request.adapter else None
        except UnknownAdapter as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter: {exc}")
        try:
            prompt_ids, prompt_field = self._prompt(engine, request)
            hint = request.output_length_hint
            req = engine.new_request(
                prompt_ids,
                params_from_proto(request.sampling),
                request_id=request.request_id,
                lower_hint=hint.lower if hint.HasField("lower") else None,
                upper_hint=hint.upper if hint.HasField("upper") else None,
                prompt_field=prompt_field,
                adapter=adapter,
            )
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        want_text = request.return_text if request.HasField("return_text") else True
        want_ids = request.return_token_ids if request.HasField("return_token_ids") else True

        try:
            async with contextlib.aclosing(request_events(engine, req)) as batches:
                async for events in batches:
                    chunk = pb.Chunk()
                    final: Finished | None = None
                    for ev in events:
                        if isinstance(ev, Chunk):
                            if want_ids:
                                chunk.token_ids.extend(ev.token_ids)
                            if want_text:
                                chunk.text += ev.text
                            chunk.logprobs.extend(_token_logprobs(ev.logprobs))
                            chunk.prompt_logprobs.extend(_token_logprobs(ev.prompt_logprobs))
                        else:
                            final = ev
                    if chunk.token_ids or chunk.text or chunk.logprobs or chunk.prompt_logprobs:
                        yield pb.GenerateResponse(request_id=req.id, chunk=chunk)
                    if final is not None:
                        if final.error is not None and final.invalid:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, final.error)
                        if final.error is not None:
                            await context.abort(grpc.StatusCode.INTERNAL, f"engine error: {final.error}")
                        yield pb.GenerateResponse(request_id=req.id, final=_final_to_proto(final))
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        engine = await self._ready_engine(context, request)
        return pb.AbortResponse(aborted=engine.abort(list(request.request_ids)))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        engine = await self._ready_engine(context, request)
        mc, cfg = engine.model_config, engine.config
        return pb.ModelInfo(
            model_name=engine.model_name,
            context_length=mc.context_length,
            vocab_size=mc.vocab_size,
            eos_token_ids=list(engine.tokenizer.eos_ids),
            has_chat_template=engine.tokenizer.chat_template is not None,
            kv_block_size=cfg.kv_block_size,
            kv_blocks_total=engine.num_kv_blocks,
            device=str(engine.device),
            dtype=str(engine.dtype).removeprefix("torch."),
            scheduler=cfg.scheduler,
            kv_cache_dtype=str(engine.kv_dtype).removeprefix("torch."),
            adapters=[pb.AdapterInfo(name=a.name, path=str(a.path), rank=a.rank) for a in engine.loaded_adapters()],
            max_loras=cfg.max_loras if cfg.lora_enabled else 0,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.Load:
        engine = await self._ready_engine(context, request)
        return load_to_proto(engine.load(), engine.model_name)

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Load]:
        engine = await self._ready_engine(context, request)
        interval = max(request.interval_ms or 1000, 50) / 1000
        while True:
            yield load_to_proto(engine.load(), engine.model_name)
            await asyncio.sleep(interval)


def _token_logprobs(entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[pb.TokenLogprobs]:
    return [
        pb.TokenLogprobs(token_id=tok, logprob=lp, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])
        for tok, lp, top in entries
    ]


def _final_to_proto(f: Finished) -> pb.Final:
    return pb.Final(
        finish_reason=_FINISH[f.reason],
        stop=f.stop,
        usage=pb.Usage(
            prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens, cached_tokens=f.cached_tokens
        ),
        timings=pb.Timings(queue_s=f.queue_s, time_to_first_token_s=f.ttft_s, total_s=f.total_s),
        evictions=f.evictions,
    )


def _handlers(service: EngineService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Generate": server_stream(service.Generate, pb.GenerateRequest),
            "Abort": unary(service.Abort, pb.AbortRequest),
            "GetModelInfo": unary(service.GetModelInfo, pb.GetModelInfoRequest),
            "GetLoad": unary(service.GetLoad, pb.GetLoadRequest),
            "WatchLoad": server_stream(service.WatchLoad, pb.WatchLoadRequest),
        },
    )


class _OwnLoad:
    """The engine's load in process, shaped as the sidecar's LoadFollower for its LoadCollector (the HTTP port's
    /metrics, which the Gateway API Inference Extension's endpoint picker scrapes on the port it routes to)."""

    def __init__(self, service: EngineService) -> None:
        self.service = service
        self.config = SidecarConfig()

    @property
    def fresh(self) -> bool:
        return self.service.engine is not None

    @property
    def latest(self) -> pb.Load | None:
        engine = self.service.engine
        return None if engine is None else load_to_proto(engine.load(), engine.model_name)


def metrics_renderer(service: EngineService) -> Callable[[], bytes]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoadCollector(_OwnLoad(service)))
    return lambda: bytes(generate_latest(registry))


class Server:
    """Owns the grpc.aio server (and the OpenAI HTTP server when `http_port` is not None; 0 picks a free port),
    the health status and the engine's life cycle."""

    def __init__(
        self,
        config: EngineConfig,
        host: str,
        port: int,
        grace_s: float = 30.0,
        engine_factory: Callable[[], Engine] | None = None,
        http_port: int | None = None,
        api_key: str | None = None,
    ) -> None:
        self.config = config
        self.engine_factory = engine_factory
        self.host = host
        self.address = f"{host}:{port}"
        self.grace_s = grace_s
        self.service = EngineService()
        self.port = 0
        self.http_port = http_port
        self.api_key = api_key
        self.http: HttpServer | None = None

    async def start(self) -> None:
        # grpc.aio objects bind to the running event loop, so they are made here, not in __init__.
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._stopped = asyncio.Event()
        self.server.add_generic_rpc_handlers(
            (_handlers(self.service), kserve.handlers(kserve.KServeService(self.service)))
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        names = (SERVICE, kserve.SERVICE, health_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        if self.http_port is not None:
            try:
                from .openai_api import HttpServer, OpenAIService  # aiohttp: only where the HTTP API is served
            except ModuleNotFoundError as exc:
                raise RuntimeError(
                    f"the OpenAI-compatible API needs {exc.name} (a dependency); or pass --no-http"
                ) from exc

            self.http = HttpServer(
                OpenAIService(self.service, metrics_renderer(self.service), self.api_key), self.host, self.http_port
            )
            await self.http.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def load(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Loads the model off the event loop, then reports the Engine service SERVING."""
        factory = self.engine_factory or (lambda: Engine(self.config, progress))
        self.service.engine = await asyncio.to_thread(factory)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        """Stops listening at once (no drain): both ports."""
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=None)

    async def drain_and_stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, no new requests, in-flight ones finish within the grace period."""
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.service.engine is not None:
            await asyncio.to_thread(self.service.engine.drain, self.grace_s)
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        self._stopped.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain_and_stop()))
        await self._stopped.wait()
