"""Reads Llama-family weights from GGUF files and Hugging Face safetensors folders.

Both formats end up as one dict with our parameter names (see `llama.PARAM_NAMES`) in float32 on the CPU; the
model casts and moves them. Every failure surfaces as `ModelLoadError` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from .gguf_file import GGUFFile
from .native import NativeWeight, supported_type, widen
from .native import unavailable_reason as native_unavailable_reason
from .tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says why in one line."""


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    # The GGUF tensors stored as Q4_0/Q4_1/Q8_0 in the native kernels' layout (only when asked for), by our names.
    blocks: dict[str, NativeWeight] = field(default_factory=dict)


ProgressFn = Callable[[int, int], None]


def load_model(path: Path, progress: ProgressFn | None = None, keep_blocks: bool = False) -> LoadedModel:
    """Loads a `.gguf` file or a folder with `config.json` and `*.safetensors`.

    With `keep_blocks`, GGUF tensors stored as Q4_0/Q4_1/Q8_0 are also returned as their blocks (`native.py`).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    try:
        if path.is_dir():
            return _load_hf_dir(path, progress)
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model folder")
        return _load_gguf(path, progress, keep_blocks)
    except ModelLoadError:
        raise
    except Exception as exc:  # a malformed file can fail anywhere inside the readers
        raise ModelLoadError(f"{path}: cannot load model: {type(exc).__name__}: {exc}".splitlines()[0]) from exc


# --------------------------------------------------------------------------------------------------- GGUF


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of Q/K (interleaved rotary pairs back to rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
}
_GGUF_BIASES = {"attn_q": "bq", "attn_k": "bk", "attn_v": "bv"}


def _gguf_field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    value = reader.get(key)
    if value is None:
        if default is None:
            raise ModelLoadError(f"GGUF metadata lacks {key}")
        return default
    return value


def _load_gguf(path: Path, progress: ProgressFn | None, keep_blocks: bool) -> LoadedModel:
    import gguf

    try:
        reader = GGUFFile(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})".splitlines()[0]) from exc
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (llama or qwen2)")
    n_head = int(_gguf_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_gguf_field(reader, f"{arch}.embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: GGUF file has no token_embd.weight tensor")
    vocab = int(_gguf_field(reader, f"{arch}.vocab_size", default=tensors["token_embd.weight"].shape[-1]))
    config = ModelConfig(
        name=str(_gguf_field(reader, "general.name", default=path.stem)),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_gguf_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_gguf_field(reader, f"{arch}.block_count")),
        num_heads=n_head,
        num_kv_heads=int(_gguf_field(reader, f"{arch}.attention.head_count_kv", default=n_head)),
        head_dim=int(_gguf_field(reader, f"{arch}.rope.dimension_count", default=hidden // n_head)),
        rope_theta=float(_gguf_field(reader, f"{arch}.rope.freq_base", default=10000.0)),
        rms_norm_eps=float(_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", default=1e-5)),
        context_length=int(_gguf_field(reader, f"{arch}.context_length", default=2048)),
        tie_embeddings="output.weight" not in tensors,
        attention_bias=arch == "qwen2",
    )
    # llama.cpp permutes Llama's Q/K rows for its interleaved rotary; Qwen2's keep Hugging Face's order (NeoX rotary)
    permuted = arch == "llama"
    config.validate()

    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, NativeWeight] = {}
    # block tensors kept for the native kernels are widened to floats by them (the same values: d * q is exact in
    # float32; 0.1 s instead of the gguf package's 0.8 s of numpy for SmolLM2)
    widen_natively = keep_blocks and native_unavailable_reason() is None
    for i, (name, tensor) in enumerate(tensors.items()):
        shape = [int(d) for d in reversed(tensor.shape)]
        packed = None
        if keep_blocks and len(shape) == 2 and supported_type(int(tensor.tensor_type)):
            packed = NativeWeight.from_gguf(tensor.data, int(tensor.tensor_type), shape[0], shape[1])
        array = None
        if packed is None or not widen_natively:
            array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            array = array.reshape(shape)
        parts = name.split(".")
        if parts[0] == "blk":
            layer, kind = int(parts[1]), parts[2]
            if parts[-1] == "bias" and config.attention_bias and kind in _GGUF_BIASES:
                weights[f"layers.{layer}.{_GGUF_BIASES[kind]}"] = torch.from_numpy(np.array(array, dtype=np.float32))
                if progress is not None:
                    progress(i + 1, len(tensors))
                continue
            if kind not in _GGUF_NAMES or parts[-1] != "weight":
                raise ModelLoadError(f"{path}: unexpected tensor {name}")
            heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(kind) if permuted else None
            if heads is not None:
                if array is not None:
                    array = _unpermute_rope(array, heads)
                if packed is not None:
                    packed = packed.map_rows(functools.partial(_unpermute_rope, n_head=heads))
            key = f"layers.{layer}.{_GGUF_NAMES[kind]}"
        elif name == "token_embd.weight":
            key = "embed"
        elif name == "output_norm.weight":
            key = "norm"
        elif name == "output.weight":
            key = "lm_head"
        elif name.startswith("rope_"):
            continue  # precomputed rope factors are not used by the models we support
        else:
            raise ModelLoadError(f"{path}: unexpected tensor {name}")
        if array is None:
            assert packed is not None
            weights[key] = widen(packed)
        else:
            weights[key] = torch.from_numpy(array.copy())
        if packed is not None:
            blocks[key] = packed
        if progress is not None:
            progress(i + 1, len(tensors))
    tokenizer = tokenizer_from_gguf(reader, path)
    return LoadedModel(config, weights, tokenizer, blocks)


# ------------------------------------------------------------------------------------------ safetensors


_HF_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}


def _load_hf_dir(path: Path, progress: ProgressFn | None) -> LoadedModel:
    from safetensors import safe_open

    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path}: no config.json in the model folder")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ModelLoadError(f"{path}: model_type {model_type!r} is not supported (llama, mistral or qwen2)")
    if raw.get("rope_scaling"):
        raise ModelLoadError(f"{path}: rope_scaling {raw['rope_scaling']!r} is not supported yet")
    if raw.get("use_sliding_window"):
        raise ModelLoadError(f"{path}: use_sliding_window is not supported (attention here spans the whole context)")
    if raw.get("mlp_bias") or (model_type != "qwen2" and raw.get("attention_bias")):
        raise ModelLoadError(f"{path}: biases in the {'MLP' if raw.get('mlp_bias') else 'output projection'} are "
                             "not supported (Q/K/V biases are, as in qwen2)")  # fmt: skip
    n_head = int(raw["num_attention_heads"])
    rope = raw.get("rope_parameters") or {}
    config = ModelConfig(
        name=str(raw.get("_name_or_path") or path.name),
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=n_head,
        num_kv_heads=int(raw.get("num_key_value_heads", n_head)),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // n_head),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        context_length=int(raw.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
    )
    config.validate()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files in the model folder")
    weights: dict[str, torch.Tensor] = {}
    for n, file in enumerate(files):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                key = _hf_key(name)
                if key is not None:
                    weights[key] = f.get_tensor(name).to(torch.float32)
        if progress is not None:
            progress(n + 1, len(files))
    if "lm_head" in weights and config.tie_embeddings:
        del weights["lm_head"]
    if "lm_head" not in weights and not config.tie_embeddings:
        config = dataclasses.replace(config, tie_embeddings=True)
    return LoadedModel(config, weights, tokenizer_from_hf_dir(path))


def _hf_key(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "model.norm.weight":
        return "norm"
    if name == "lm_head.weight":
        return "lm_head"
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in _HF_NAMES:
        return f"layers.{int(parts[2])}.{_HF_NAMES[parts[3]]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise ModelLoadError(f"unexpected tensor {name}")
