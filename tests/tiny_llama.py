"""Writes a tiny random-weight Llama (with a tiny byte-level BPE tokenizer) as GGUF and as a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges): specials first (ids 0-2), then 256 bytes, then a few merged tokens."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = SPECIALS + byte_level_alphabet() + [m.replace(" ", "") for m in merges]
    return tokens, merges


def hf_config(tie: bool, arch: str = "llama") -> dict[str, Any]:
    """arch: llama, or qwen2 (Q/K/V biases)."""
    tokens, _ = tiny_vocab()
    extra = {"use_sliding_window": False} if arch == "qwen2" else {}
    return {
        **extra,
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": len(tokens),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def random_weights(tie: bool, seed: int = 0, bias: bool = False) -> dict[str, torch.Tensor]:
    """HF-named weights, scaled so logits are far from flat (greedy choices are not near-ties); `bias`: Q/K/V
    biases as large as the projections' outputs (qwen2)."""
    cfg = hf_config(tie)
    g = torch.Generator().manual_seed(seed)
    h, inter, v = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    q, kv = 4 * 16, 2 * 16

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / cols**0.5

    w = {
        "model.embed_tokens.weight": torch.randn(v, h, generator=g),
        "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
    }
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "self_attn.q_proj.weight"] = mat(q, h) * 2
        w[p + "self_attn.k_proj.weight"] = mat(kv, h) * 2
        w[p + "self_attn.v_proj.weight"] = mat(kv, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, q)
        if bias:
            for name, size in (("q", q), ("k", kv), ("v", kv)):
                w[p + f"self_attn.{name}_proj.bias"] = torch.randn(size, generator=g)
        w[p + "mlp.gate_proj.weight"] = mat(inter, h)
        w[p + "mlp.up_proj.weight"] = mat(inter, h)
        w[p + "mlp.down_proj.weight"] = mat(h, inter)
    if not tie:
        w["lm_head.weight"] = mat(v, h) * 4
    return w


def write_hf_dir(folder: Path, tie: bool = False, seed: int = 0, arch: str = "llama") -> Path:
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(tie, arch)))
    weights = random_weights(tie, seed, bias=arch == "qwen2")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    tokens, merges = tiny_vocab()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE})
    )
    return folder


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face -> llama.cpp row order for Q/K (what llama.cpp's converter does)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, tie: bool = True, seed: int = 0, arch: str = "llama", qtype: Any = None) -> Path:
    """As llama.cpp's converter writes it: Llama's Q/K rows permuted, Qwen2's not (NeoX rotary) but with biases;
    `qtype` (a GGMLQuantizationType): the layers' matrices stored in those blocks."""
    import gguf

    cfg = hf_config(tie, arch)
    qwen2 = arch == "qwen2"
    w = {k: v.numpy().astype(np.float32) for k, v in random_weights(tie, seed, bias=qwen2).items()}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(float(cfg["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(0)
    tokens, merges = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if qwen2 else "default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    if not tie:
        writer.add_tensor("output.weight", w["lm_head.weight"])
    for i in range(int(cfg["num_hidden_layers"])):
        for hf, gg in names.items():
            t = w[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q" and not qwen2:
                t = _permute(t, 4)
            elif gg == "attn_k" and not qwen2:
                t = _permute(t, 2)
            if qtype is None:
                writer.add_tensor(f"blk.{i}.{gg}.weight", t)
            elif t.ndim == 2:
                writer.add_tensor(f"blk.{i}.{gg}.weight", gguf.quants.quantize(t, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(f"blk.{i}.{gg}.weight", t)
            if qwen2 and gg in ("attn_q", "attn_k", "attn_v"):
                writer.add_tensor(f"blk.{i}.{gg}.bias", w[f"model.layers.{i}.{hf}.bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
