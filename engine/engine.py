"""The engine: owns the model, KV cache, scheduler and sampler, and runs steps on its own thread.

Callers (the gRPC server, tests, benchmarks) submit requests with a sink; the engine thread calls the sink with
`Chunk` and `Finished` events. `submit`, `abort`, `load` and `drain` are thread-safe.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .attention.sparse.config import pattern_config_for
from .config import ConfigError, EngineConfig, adapter_name_problem
from .kv_cache import BlockAllocator, allocate_cache, bytes_per_token, memory_limit, resident_bytes
from .malloc import keep_freed_memory
from .metrics import EngineStats
from .model import native
from .model.llama import Llama
from .model.loader import ProgressFn, load_model
from .model.lora import AdapterError, LoraAdapter, load_adapter
from .model.quant import fp16_available
from .outputs import Chunk, Event, Finished, OutputState
from .request import FinishReason, InvalidRequest, Request, SamplingParams, Status
from .runner import ModelRunner, PromptSpan
from .sampler import Logprobs, prompt_logprobs, sample
from .scheduler.policies import make_policy
from .scheduler.predictor import LowerBoundPredictor
from .scheduler.scheduler import ScheduledRequest, Scheduler
from .speculative import Speculator, accepted
from .structured import Grammars, failure

log = logging.getLogger(__name__)
SPARSE_GPU_CHUNK = 16384  # prefill chunk from which sparse prefill pays on a GPU (session 27, one H200)


def sparse_chunk_advice(device: str, max_batched_tokens: int) -> str | None:
    """A warning for sparse prefill on a GPU with chunks too small for it to pay, else None."""
    if device != "cuda" or max_batched_tokens >= SPARSE_GPU_CHUNK:
        return None
    return (
        f"sparse prefill re-estimates its pattern for every prefill chunk: with chunks of {max_batched_tokens} "
        "tokens (--max-batched-tokens) it can be slower than dense prefill on a GPU (on an H200 at 128K tokens: "
        f"4K chunks 0.75x dense, 16K chunks 1.35x, whole prompts 2.7x); {SPARSE_GPU_CHUNK} or more is where it "
        "pays, at the cost of longer steps for requests decoding meanwhile"
    )


Sink = Callable[[Event], None]
T = TypeVar("T")


class EngineUnavailable(RuntimeError):
    """The engine is not accepting requests (still loading, draining or stopped)."""


class QueueFull(RuntimeError):
    """The waiting queue is at its bound."""


class UnknownAdapter(LookupError):
    """A request names a LoRA adapter that is not loaded."""


@dataclass
class LoadSnapshot:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    evictions_total: int
    lower_bound_demand_blocks: int
    ready: bool
    stats: EngineStats
    sparse_prefill_tokens: int = 0
    kv_block_size: int = 16
    # LoRA adapters of the running and the waiting requests (names), and the most that run at once (0: no LoRA)
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _group(req: Request) -> str:
    """What the length predictor keys a request's outputs by: its LoRA adapter's name, "" for the base model."""
    return req.adapter.name if req.adapter is not None else ""


def _adapter_names(requests: Iterable[Request]) -> tuple[str, ...]:
    """The distinct adapters of `requests`, by name, in first-seen order."""
    return tuple(dict.fromkeys(r.adapter.name for r in requests if r.adapter is not None))


def _stopper(engine: weakref.ref[Engine]) -> Callable[[], None]:
    """A function that shuts the engine down if it still exists (atexit must not keep it alive)."""

    def stop() -> None:
        alive = engine()
        if alive is not None:
            alive.shutdown()

    return stop


class Engine:
    def __init__(self, config: EngineConfig, progress: ProgressFn | None = None) -> None:
        """Loads the model and starts the engine thread; raises what loading raised (ConfigError, ModelError...).

        All model work, loading included, runs on the engine thread. On CPU this matters for speed: each thread
        that runs parallel torch operators gets its own OpenMP team, and once a process holds more OpenMP threads
        than it has cores, libgomp stops letting idle team threads spin between parallel regions, so every
        operator of a step pays for waking them (measured on 2 cores: a batch-1 decode step 10% slower when the
        model was loaded on another thread).
        """
        config.validate()
        self.config = config
        self._lock = threading.Condition()
        self._inbox: list[tuple[Request, Sink]] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []  # run on the engine thread (_on_engine_thread)
        self._requests: dict[str, tuple[Request, Sink, OutputState]] = {}
        self._known_ids: set[str] = set()  # ids accepted and not finished (inbox included)
        self._accepting = True
        self._stopping = False
        self._ids = itertools.count()
        loaded = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(progress, loaded, failure), name="optimist-engine", daemon=True
        )
        self._thread.start()
        loaded.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        # Stop the engine thread before the interpreter finalizes: a daemon thread still working then (freeing a
        # step's tensors after the caller got its last token, say) is killed when it next takes the GIL, and if
        # that is inside torch's C++ the process aborts ("terminate called without an active exception").
        self._stop_at_exit = _stopper(weakref.ref(self))
        atexit.register(self._stop_at_exit)

    def _run(self, progress: ProgressFn | None, loaded: threading.Event, failure: list[BaseException]) -> None:
        try:
            self._setup(progress)
        except BaseException as exc:  # handed to the constructor's caller
            failure.append(exc)
            return
        finally:
            loaded.set()
        try:
            self._loop()
        finally:
            self.grammars.close()

    def _setup(self, progress: ProgressFn | None) -> None:
        config = self.config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = self._kv_dtype(config)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        if self.device.type == "cpu":
            keep_freed_memory()  # steps reuse warm heap pages instead of page-faulting fresh ones (malloc.py)
        weights = self._weights_mode(config)
        if config.kv_cache_memory_fraction and self.device.type != "cuda":
            raise ConfigError("kv_cache_memory_fraction needs a CUDA device; use kv_cache_tokens on CPU")
        loaded = load_model(config.model_path(), progress=progress, keep_blocks=weights == "int4")
        self.model_config = loaded.config
        if config.max_model_len:
            if config.max_model_len > loaded.config.context_length:
                raise ConfigError(
                    f"max_model_len ({config.max_model_len}) exceeds the model's context "
                    f"({loaded.config.context_length})"
                )
            self.model_config = dataclasses.replace(loaded.config, context_length=config.max_model_len)
        self.tokenizer = loaded.tokenizer
        model = Llama.for_weights(loaded.config)
        model.load_weights(loaded.weights)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        int8 = False
        if weights == "int4":
            # Layers without blocks, and calls of many rows, get float16 weights where fbgemm has them.
            int8 = self._int8_prefill(config)
            if self.model.use_native(loaded.blocks, fp16_available(), int8) == 0:
                if config.weights == "int4":
                    raise ConfigError("weights=int4 needs a GGUF model with Q4_0, Q4_1 or Q8_0 tensors")
                weights = "fp16" if fp16_available() else "float"  # auto, on a file with no such blocks
        elif weights == "fp16":
            self.model.use_fp16()
        if config.prefill_gemm == "int8" and weights != "int4":
            raise ConfigError(f"prefill_gemm=int8 needs int4 weights (GGUF blocks read natively), these are {weights}")
        if config.prefill_gemm == "int8" and not int8:
            raise ConfigError("prefill_gemm=int8 needs a CPU with AVX-512 VNNI; this one has none (use auto or float)")
        self.weights = weights
        # what the matmuls of long prompts' prefill chunks take: int8 or float activations (--prefill-gemm)
        self.prefill_gemm = "int8" if weights == "int4" and int8 else "float"
        del loaded
        self.model.init_rope()
        # adapters before the cache: on CUDA its share of free memory is measured after them
        self.adapters: dict[str, LoraAdapter] = {}
        for name, path in config.lora_modules:
            try:
                self.adapters[name] = self._read_adapter(name, path)
            except AdapterError as exc:
                raise ConfigError(f"lora_modules: {exc}") from exc
        self.num_kv_blocks = self._kv_blocks()
        self.allocator = BlockAllocator(self.num_kv_blocks, config.kv_block_size, config.prefix_caching)
        if self.device.type == "cpu":
            self._check_cache_fits()
        kv = allocate_cache(self.model_config, self.num_kv_blocks, config.kv_block_size, self.device, self.kv_dtype)
        if self.device.type == "cpu" and self.dtype == torch.float32 and native.unavailable_reason() is None:
            # Decode attention in C; with int4 weights, decode steps of a few sequences run as one C call.
            self.model.attach_native(kv)
        patterns = None
        if config.sparse_prefill_threshold:
            patterns = pattern_config_for(config.sparse_patterns, config.model_path(), self.model_config)
            if self.device.type == "cuda":
                self._precompile_sparse_kernels()
            advice = sparse_chunk_advice(self.device.type, config.max_num_batched_tokens)
            if advice:
                log.warning("%s", advice)
        if config.lora_enabled:  # (after attach_native, which reads the plain layers)
            self.model.attach_lora()
        self.runner = ModelRunner(self.model, kv, config.kv_block_size, config.sparse_prefill_threshold, patterns)
        self.scheduler = Scheduler(
            make_policy(config.scheduler),
            self.allocator,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.max_loras if config.lora_enabled else 0,
        )
        self.predictor = LowerBoundPredictor()
        self.stats = EngineStats()
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size)
        self.jump_forward = config.jump_forward  # may be switched while serving (benchmarks compare both)
        self.speculative = config.speculative  # likewise
        self.speculator = Speculator()

    def _read_adapter(self, name: str, path: str | Path) -> LoraAdapter:
        return load_adapter(name, path, self.model_config, self.config.max_lora_rank, self.device, self.dtype)

    # ------------------------------------------------------------------------------------- LoRA adapters

    def load_adapter(self, name: str, path: str | Path, replace: bool = False) -> LoraAdapter:
        """Loads a LoRA adapter while serving (thread-safe, from any thread but the engine's: the files are read
        and the tensors built on the engine thread between two steps). Raises AdapterError naming the problem: LoRA
        not enabled, a name taken (unless `replace`: the new files serve that name once read; requests already
        running with the old ones finish with them), too many loaded, a file or shape error."""
        if not self.config.lora_enabled:
            raise AdapterError("LoRA adapters are not enabled on this server (start it with --enable-lora)")
        problem = adapter_name_problem(name)
        if problem is not None:
            raise AdapterError(problem)
        if name == self.model_name:
            raise AdapterError(f"{name!r} is the served model's own name")

        def check() -> None:
            if name in self.adapters and not replace:
                raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
            if name not in self.adapters and len(self.adapters) >= self.config.max_loaded_loras:
                raise AdapterError(f"{len(self.adapters)} adapters are loaded, the most allowed (max_loaded_loras)")

        with self._lock:
            check()
        adapter = self._on_engine_thread(lambda: self._read_adapter(name, path))
        with self._lock:
            check()  # (another caller may have loaded one meanwhile)
            self.adapters[name] = adapter
        log.info("LoRA adapter %s loaded from %s (rank %d, %.1f MB)", name, path, adapter.rank, adapter.nbytes() / 1e6)
        return adapter

    def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the engine thread between steps and returns what it returns (or raises what it raised):
        torch work on another thread would give the process a second OpenMP team (see __init__)."""
        future: Future[T] = Future()
        with self._lock:
            if self._stopping:
                raise EngineUnavailable("the engine is stopped")
            self._calls.append((fn, future))
            self._lock.notify()
        return future.result()

    def unload_adapter(self, name: str) -> None:
        """Unloads an adapter: new requests cannot name it; those already accepted finish with it."""
        with self._lock:
            if self.adapters.pop(name, None) is None:
                raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
        log.info("LoRA adapter %s unloaded", name)

    def loaded_adapters(self) -> list[LoraAdapter]:
        with self._lock:
            return list(self.adapters.values())

    def adapter(self, name: str) -> LoraAdapter:
        """The loaded adapter called `name`; raises UnknownAdapter."""
        with self._lock:
            found = self.adapters.get(name)
        if found is None:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
        return found

    def _check_cache_fits(self) -> None:
        """A CPU cache becomes resident as it fills (`zeros_on_demand`): refuse at start one that, with what the
        process holds already, exceeds the memory it may use, rather than be killed for it under load later."""
        limit = memory_limit()
        if limit is None:
            return
        per_token = bytes_per_token(self.model_config, self.kv_dtype)
        tokens = self.num_kv_blocks * self.config.kv_block_size
        used, need = resident_bytes(), tokens * per_token
        if used + need > limit:
            fit = max(0, limit - used) // per_token
            raise ConfigError(
                f"the KV cache ({tokens} tokens, {need / 2**30:.2f} GiB) and the {used / 2**30:.2f} GiB in use "
                f"exceed the memory this process may use ({limit / 2**30:.2f} GiB, the machine's or its container's "
                f"limit): lower --kv-cache-tokens (about {fit} fit, less what requests need besides)"
            )

    def _precompile_sparse_kernels(self) -> None:
        """Compiles the sparse-prefill kernels' autotuning candidates for this model's heads before serving (the
        engine is ready after), so the first long prompt only times them instead of waiting on ~20 compilations."""
        from .attention.sparse.compile_check import precompile

        mc = self.model_config
        start = time.perf_counter()
        try:
            done = precompile(self.dtype, mc.head_dim, (mc.num_heads, mc.num_kv_heads), self.device)
        except ValueError as exc:
            raise ConfigError(f"sparse prefill on {self.device}: {exc}") from exc
        log.info("sparse prefill: %d kernel programs compiled in %.1f s", done, time.perf_counter() - start)

    def _weights_mode(self, config: EngineConfig) -> str:
        """The weight mode to load with: the configured one, checked, or what `auto` picks here."""
        cpu32 = self.device.type == "cpu" and self.dtype == torch.float32
        if config.weights == "auto":
            # The file's own blocks where the native kernels run (exact weights, float32 arithmetic); else float16
            # weights with float32 arithmetic where fbgemm has them; else exact float32.
            if cpu32 and Path(config.model_path()).suffix == ".gguf" and native.unavailable_reason() is None:
                return "int4"
            return "fp16" if cpu32 and fp16_available() else "float"
        if config.weights == "int4":
            if self.device.type != "cpu" or self.dtype != torch.float32:
                raise ConfigError("weights=int4 needs the CPU device and dtype float32 (its kernels are CPU ones)")
            reason = native.unavailable_reason()
            if reason is not None:
                raise ConfigError(f"weights=int4: {reason}")
        if config.weights == "fp16" and (self.device.type != "cpu" or not fp16_available()):
            raise ConfigError("weights=fp16 needs the CPU device and torch's fbgemm float16 GEMM (x86 builds)")
        return config.weights

    def _kv_dtype(self, config: EngineConfig) -> torch.dtype:
        """The KV cache's element type: the model's, or float16 under a float32 model on CPU (`kv_cache_dtype`)."""
        if config.kv_cache_dtype in ("auto", str(self.dtype).removeprefix("torch.")):
            return self.dtype
        if config.kv_cache_dtype == "float16":
            if self.device.type != "cpu" or self.dtype != torch.float32:
                raise ConfigError(
                    f"kv_cache_dtype=float16 is for CPU engines with float32 activations; this one runs "
                    f"{str(self.dtype).removeprefix('torch.')} on {self.device.type} (its cache is the model's dtype)"
                )
            return torch.float16
        raise ConfigError(
            f"kv_cache_dtype={config.kv_cache_dtype} under a {str(self.dtype).removeprefix('torch.')} model: use auto"
        )

    @staticmethod
    def _int8_prefill(config: EngineConfig) -> bool:
        """Whether prefill GEMMs over int4 weights take int8 activations here (`prefill_gemm`: auto or int8, on a
        CPU with VNNI)."""
        return config.prefill_gemm != "float" and bool(native.library().native_vnni())

    # ------------------------------------------------------------------------------------- public API

    @property
    def accepting(self) -> bool:
        """Takes new requests (loaded, not draining, not stopped)."""
        with self._lock:
            return self._accepting and not self._stopping

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.model_config.name

    def _kv_blocks(self) -> int:
        """KV blocks: from kv_cache_tokens, or from a share of the GPU memory left after loading the weights."""
        cfg = self.config
        if not cfg.kv_cache_memory_fraction:
            return cfg.num_kv_blocks
        mc = self.model_config
        free, _total = torch.cuda.mem_get_info(self.device)
        block_bytes = cfg.kv_block_size * bytes_per_token(mc, self.kv_dtype)
        blocks = int(free * cfg.kv_cache_memory_fraction) // block_bytes
        if blocks < 1:
            raise ConfigError(
                f"kv_cache_memory_fraction {cfg.kv_cache_memory_fraction} of {free / 2**30:.2f} GiB free "
                "leaves no room for one KV block"
            )
        return blocks

    def new_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str = "",
        lower_hint: int | None = None,
        upper_hint: int | None = None,
        prompt_field: str = "prompt",
        adapter: LoraAdapter | None = None,
    ) -> Request:
        """Validates a request against the model and the cache; raises InvalidRequest naming the field. `adapter`:
        the LoRA adapter it runs with (from `adapter(name)`), None for the base model."""
        cfg, ctx = self.config, self.model_config.context_length
        params.validate(self.model_config.vocab_size, cfg.max_stop_strings, cfg.max_stop_string_chars)
        if not prompt_ids:
            raise InvalidRequest(prompt_field, "the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(prompt_field, f"token id {bad} is outside the vocabulary (size {vocab})")
        if len(prompt_ids) >= ctx:
            raise InvalidRequest(prompt_field, f"the prompt has {len(prompt_ids)} tokens; the context is {ctx}")
        if len(prompt_ids) + params.max_tokens > ctx:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context ({ctx})",
            )
        capacity = self.num_kv_blocks * cfg.kv_block_size
        if len(prompt_ids) + params.max_tokens > capacity:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) cannot fit in the KV cache "
                f"({capacity} tokens)",
            )
        if lower_hint is not None and upper_hint is not None and lower_hint > upper_hint:
            raise InvalidRequest("output_length_hint", f"lower ({lower_hint}) is above upper ({upper_hint})")
        req = Request(
            id=request_id or f"req-{uuid.uuid4().hex[:16]}",
            prompt_ids=list(prompt_ids),
            params=params,
            lower_hint=lower_hint,
            upper_hint=upper_hint,
            adapter=adapter,
        )
        if adapter is not None:
            req.hash_root = adapter.hash_root  # K/V under an adapter are its own: shared only with its requests
        if 0 < cfg.sparse_prefill_threshold < len(prompt_ids):
            req.hash_root += b"sparse"  # its K/V come from sparse prefill: never shared with dense requests
        if params.prompt_logprobs is not None:  # every prompt position is computed here: nothing from the cache
            req.hash_root = b"prompt-logprobs:" + req.id.encode()
        if params.seed is not None and not params.greedy:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(params.seed)
        if params.structured_output is not None:
            req.matcher = self.grammars.matcher(params.structured_output)
        return req

    def submit(self, request: Request, sink: Sink) -> None:
        with self._lock:
            if not self._accepting:
                raise EngineUnavailable("the engine is draining and accepts no new requests")
            if request.id in self._known_ids:
                raise InvalidRequest("request_id", f"a request with id {request.id!r} is already running")
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
            request.arrival = time.monotonic()
            self._known_ids.add(request.id)
            self._inbox.append((request, sink))
            self._lock.notify()

    def abort(self, request_ids: Sequence[str]) -> list[str]:
        """Aborts the given requests (their blocks are freed before the next step); returns the known ones."""
        with self._lock:
            known = [rid for rid in request_ids if rid in self._known_ids]
            self._aborts.extend(known)
            self._lock.notify()
            return known

    def load(self) -> LoadSnapshot:
        with self._lock:
            bs = self.config.kv_block_size
            demand = 0
            for req in itertools.chain(self.scheduler.running, self.scheduler.waiting, (r for r, _ in self._inbox)):
                planned = max(req.bound, len(req.output_ids) + 1)
                demand += -(-(len(req.prompt_ids) + planned) // bs)
            return LoadSnapshot(
                waiting=len(self.scheduler.waiting) + len(self._inbox),
                running=len(self.scheduler.running),
                kv_blocks_used=self.allocator.num_used,
                kv_blocks_total=self.allocator.num_blocks,
                evictions_total=self.scheduler.evictions_total,
                lower_bound_demand_blocks=demand,
                ready=self._accepting and not self._stopping,
                stats=_copy_stats(self.stats),
                sparse_prefill_tokens=self.runner.sparse_tokens,
                kv_block_size=bs,
                running_adapters=_adapter_names(self.scheduler.running),
                waiting_adapters=_adapter_names(itertools.chain(self.scheduler.waiting, (r for r, _ in self._inbox))),
                max_loras=self.config.max_loras if self.config.lora_enabled else 0,
            )

    def generate(self, request: Request, timeout_s: float = 600.0) -> tuple[list[int], str, Finished]:
        """Submits and waits: (output token ids, text, final event). For scripts, tests and benchmarks."""
        done = threading.Event()
        events: list[Event] = []

        def sink(event: Event) -> None:
            events.append(event)
            if isinstance(event, Finished):
                done.set()

        self.submit(request, sink)
        if not done.wait(timeout_s):
            self.abort([request.id])
            raise TimeoutError(f"request {request.id} did not finish within {timeout_s} s")
        chunks = [e for e in events if isinstance(e, Chunk)]
        final = events[-1]
        assert isinstance(final, Finished)
        return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), final

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._known_ids

    def drain(self, grace_s: float) -> None:
        """Stops admitting, lets in-flight requests finish for up to `grace_s`, aborts the rest, stops the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace_s
        while not self.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._aborts.extend(self._known_ids)
            self._lock.notify()
        while not self.idle and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)
        atexit.unregister(self._stop_at_exit)

    # ------------------------------------------------------------------------------------- engine thread

    def _has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self._calls or self._has_work() or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    for _, future in self._calls:
                        future.set_exception(EngineUnavailable("the engine is stopped"))
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
                for req, sink in inbox:
                    req.bound = self.predictor.predict(
                        len(req.prompt_ids), req.params.max_tokens, req.lower_hint, _group(req)
                    )
                    self._requests[req.id] = (req, sink, OutputState(req, self.tokenizer))
                    self.scheduler.add(req)
                for rid in aborts:
                    if rid in self._requests:
                        self._finish(self._requests[rid][0], FinishReason.ABORTED, "")
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller's to handle
                    future.set_exception(exc)
            if self._has_work():
                try:
                    self._step()
                except Exception as exc:  # a bug: fail what was in flight, keep serving
                    log.exception("engine step failed")
                    with self._lock:
                        for req in list(self.scheduler.running):
                            self._finish(req, FinishReason.ABORTED, "", error=f"{type(exc).__name__}: {exc}")

    def _step(self) -> None:
        # speculative decoding: the drafts each decoding request's step computes (speculative.py)
        self.speculator.propose(self.scheduler.running, self.speculative, self.model_config.context_length)
        with self._lock:
            plan = self.scheduler.schedule()
        if not plan.scheduled:
            if not self.scheduler.running and self.scheduler.waiting:
                time.sleep(0.001)  # nothing fits now; cannot happen for validated requests, avoid a hot spin
            return
        now = time.monotonic()
        for s in plan.scheduled:
            if s.request.admitted_at is None:
                s.request.admitted_at = now
                self.stats.queue.observe(now - s.request.arrival)
                self.stats.prompt_tokens += len(s.request.prompt_ids)
                self.stats.prefix_cache_hit_tokens += s.request.cached_tokens
        # Structured outputs: the token masks of the rows sampled this step (a request's, then its drafts'),
        # filled while the model runs.
        grammar_owners = [s for s in plan.scheduled if s.completes and s.request.matcher is not None]
        constrained = [s.request for s in grammar_owners]
        masks = None
        if grammar_owners:
            masks = self.grammars.start_masks(constrained, [s.request.draft[: s.drafts] for s in grammar_owners])
        started = time.perf_counter()
        logits, owners, prompt_spans = self.runner.execute(plan.scheduled)
        scored = sum(span.count for span in prompt_spans)
        prompt_lps = [(span, prompt_logprobs(logits, row, span)) for span, row in _rows(prompt_spans)]
        logits = logits[scored:]
        # one row per owner, and one more per draft: the request as it would be had the drafts before it been kept
        rows = [r for s in owners for r in _row_views(s)]
        grammar = None
        if masks is not None:
            first = {id(r): i for i, r in enumerate(rows)}  # (each owner's own row; its drafts' rows follow it)
            mask_rows = [first[id(s.request)] + j for s in grammar_owners for j in range(1 + s.drafts)]
            grammar = (mask_rows, masks.result())
        result = sample(logits, rows, self.tokenizer.eos_ids, grammar)
        if len(rows) == sum(s.num_new for s in plan.scheduled):  # a decode step: the drafts' cost model learns
            self.speculator.cost.observe(len(rows), time.perf_counter() - started)
        kept = self._verify(owners, result.token_ids, result.logprobs)
        now = time.monotonic()
        with self._lock:
            self.scheduler.cache_computed(plan.scheduled)
            self.stats.steps += 1
            for span, entries in prompt_lps:  # before the request's first token (the same step may sample it)
                if span.request.status is Status.RUNNING:
                    span.request.prompt_logprobs_next = span.first + span.count
                    _emit(self._requests[span.request.id][1], Chunk([], "", prompt_logprobs=entries))
            for req in constrained:  # a grammar that failed while its mask was computed ends its request alone
                if (why := failure(req.matcher)) is not None:
                    self._finish(
                        req, FinishReason.ABORTED, "", error=f"sampling.structured_output: {why}", invalid=True
                    )
            for s, (tokens, lps) in zip(owners, kept, strict=True):
                self._on_token(s.request, tokens, lps, now)
                if s.drafts:
                    self.scheduler.trim(s.request)

    def _verify(
        self, owners: Sequence[ScheduledRequest], sampled: list[int], logprobs: list[Logprobs | None]
    ) -> list[tuple[list[int], list[Logprobs | None]]]:
        """Each owner's tokens this step (and their logprobs): its row's sample, or with drafts the drafts every
        earlier row's sample confirmed and the first sample that differs (or follows the last). Rejected drafts'
        positions stop counting as computed."""
        kept = []
        row = 0
        for s in owners:
            n = 1 + s.drafts
            tokens, lps = sampled[row : row + n], logprobs[row : row + n]
            row += n
            if s.drafts:
                a = accepted(s.request.draft[: s.drafts], tokens)
                tokens, lps = tokens[: a + 1], lps[: a + 1]
                s.request.num_computed -= s.drafts - a
                self.speculator.record(s.request, s.drafts, a)
                self.stats.spec_drafts += 1
                self.stats.spec_draft_tokens += s.drafts
                self.stats.spec_accepted_tokens += a
            kept.append((tokens, lps))
        return kept

    def _on_token(self, req: Request, sampled: list[int], logprobs: list[Logprobs | None], now: float) -> None:
        """Appends a step's sampled tokens (one, or more with drafts), and after them the tokens a structured
        output's language forces; emits them as one chunk and finishes the request when one of them ends it."""
        if req.status is not Status.RUNNING:
            return
        _, sink, state = self._requests[req.id]
        if req.first_token_at is None:
            req.first_token_at = now
            self.stats.ttft.observe(now - req.arrival)
        elif req.last_token_at is not None:
            self.stats.itl.observe(now - req.last_token_at)
        req.last_token_at = now
        tokens, text, error = list(sampled), "", None
        lps = [(t, lp[0], lp[1]) for t, lp in zip(sampled, logprobs, strict=True) if lp is not None]
        reason, stop = None, ""
        i = 0
        while i < len(tokens):
            t = tokens[i]
            i += 1
            req.output_ids.append(t)
            self.stats.generation_tokens += 1
            delta, reason, stop = state.append(req, t)
            text += delta
            if reason is None and req.num_tokens >= self.model_config.context_length:
                text += state.flush()
                reason = FinishReason.LENGTH
            if reason is None and req.matcher is not None:
                if not req.matcher.consume_token(t):
                    error = failure(req.matcher) or f"token {t} does not continue the language"
                elif req.matcher.is_stopped():  # the text is complete and nothing may follow
                    text += state.flush()
                    reason = FinishReason.EOS
                elif i == len(tokens) and self._jump_forward(req):
                    tokens.extend(req.matcher.compute_ff_tokens())
            if reason is not None or error is not None:
                del tokens[i:], lps[i:]
                break
            self.scheduler.on_token(req)
        _emit(sink, Chunk(tokens, text, lps))
        if error is not None:
            self._finish(req, FinishReason.ABORTED, "", error=f"sampling.structured_output: {error}", invalid=True)
        elif reason is not None:
            self._finish(req, reason, stop)

    def _jump_forward(self, req: Request) -> bool:
        """Whether the tokens a request's language forces are appended without sampling them: not when the client
        wants each token's logprobs (a forced token's would be the constrained distribution's, always 0)."""
        return self.jump_forward and req.params.logprobs is None

    def _finish(
        self, req: Request, reason: FinishReason, stop: str, error: str | None = None, invalid: bool = False
    ) -> None:
        """Frees the request's blocks and sends its final event (call with the lock held)."""
        entry = self._requests.pop(req.id, None)
        self._known_ids.discard(req.id)
        if entry is None:
            return
        _, sink, state = entry
        completed = reason is not FinishReason.ABORTED
        self.scheduler.remove(req, completed=completed)
        if completed:
            self.predictor.observe(len(req.prompt_ids), len(req.output_ids), _group(req))
        now = time.monotonic()
        self.stats.finished[reason.value] += 1
        self.stats.e2e.observe(now - req.arrival)
        tail = state.flush() if reason is FinishReason.ABORTED else ""
        if tail:
            _emit(sink, Chunk([], tail))
        _emit(
            sink,
            Finished(
                reason=reason,
                stop=stop,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                queue_s=(req.admitted_at or now) - req.arrival,
                ttft_s=(req.first_token_at - req.arrival) if req.first_token_at else 0.0,
                total_s=now - req.arrival,
                evictions=req.evictions,
                error=error,
                invalid=invalid,
            ),
        )


def _row_views(s: ScheduledRequest) -> Iterator[Request]:
    """What the sampler reads for each of an owner's rows: the request, then for the row after draft j a shallow
    copy whose output holds drafts[:j] (penalties, min_tokens and a seed's draws count them)."""
    req = s.request
    yield req
    for j in range(1, s.drafts + 1):
        view = copy.copy(req)
        view.output_ids = req.output_ids + req.draft[:j]
        yield view


def _rows(spans: list[PromptSpan]) -> Iterator[tuple[PromptSpan, int]]:
    """Each prompt span with its first row (they lead the step's logits, in order)."""
    row = 0
    for span in spans:
        yield span, row
        row += span.count


def _emit(sink: Sink, event: Event) -> None:
    """A failing sink (a caller's bug) must not take down the step, and with it every other request."""
    try:
        sink(event)
    except Exception:
        log.exception("request sink failed")


def _copy_stats(stats: EngineStats) -> EngineStats:
    return copy.deepcopy(stats)
