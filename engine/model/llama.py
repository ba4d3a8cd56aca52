"""Llama-family forward pass over a packed batch of prefill chunks and decode tokens, with a paged KV cache.

All tokens of a step are packed into one [T, hidden] tensor so the linear layers (nearly all the FLOPs) run as
one matmul; attention is the only part that looks at sequence boundaries (see `AttentionMeta`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.chunk import bottom_right_causal
from ..attention.sparse.config import HeadPattern
from ..attention.sparse.gpu import sparse_prefill_attention_triton
from ..attention.sparse.prefill import sparse_prefill_attention
from ..config import ModelConfig
from .lora import LoraBatch, LoraLinear, lora_rows
from .native import (
    ELEMENTWISE_ROWS,
    NativeDecoder,
    NativeLinear,
    NativeWeight,
    decode_attention,
    int8_rows,
    kv_dtypes,
    prefill_attention,
    prefill_keys,
    rms_norm_rows,
    rope_rows_,
    silu_mul_,
)
from .quant import Fp16Linear

_HEAD_CHUNK = 1024


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cache rows at `slots`, in the compute dtype (a float16 cache under a float32 model converts here)."""
    return cache.index_select(0, slots).to(dtype)


@dataclass
class PrefillSpan:
    """One sequence's prefill chunk inside the packed batch."""

    start: int  # first row in the packed batch
    end: int  # one past the last row
    # Cache slots of the whole context seen by this chunk (cached prefix + the chunk), or None when the chunk
    # is the entire context so far (then attention runs on the chunk's own K/V without touching the cache).
    context_slots: torch.Tensor | None
    context_len: int
    sparse: bool = False  # attend with the sequence's sparse patterns (a long prompt; see attention/sparse)
    # the chunk's matmuls may round activations to int8 (a prompt of native.WIDEN_ROWS tokens or more, in layers
    # with int8 panels: --prefill-gemm): decided per request, so other requests' rows in the step stay exact
    int8: bool = False


@dataclass
class DecodeGroup:
    """Single-token rows [start, end) of sequences with similar context lengths, attended to as one padded batch."""

    start: int
    end: int
    slots: torch.Tensor  # [B, Lmax] context slots of each sequence (padding points anywhere; it is masked)
    mask: torch.Tensor | None  # [B, 1, 1, Lmax] True where the slot is part of the context; None = no padding
    lengths: list[int]  # context length of each sequence


@dataclass
class AttentionMeta:
    positions: torch.Tensor  # [T] position of each packed token
    slot_mapping: torch.Tensor  # [T] cache slot where each token's K/V is written
    prefills: list[PrefillSpan]
    decodes: list[DecodeGroup]
    logits_rows: torch.Tensor  # rows whose next-token logits are wanted
    sparse_patterns: list[list[HeadPattern]] | None = None  # per layer, per query head; used by sparse spans
    # All decode rows' context slots [B, Lmax] and lengths [B], for the native decode attention (set by Llama)
    decode_table: tuple[torch.Tensor, torch.Tensor] | None = None
    native_prefill: bool = False  # dense prefill chunks of up to prefill_keys() keys in C (set by Llama)
    lora: LoraBatch | None = None  # rows of requests with LoRA adapters (model/lora.py); None = all base model

    def build_decode_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode groups' slots padded to one width and their lengths; the groups must be the batch's last rows."""
        assert all(a.end == b.start for a, b in itertools.pairwise(self.decodes)), "decode rows must be contiguous"
        width = max(g.slots.shape[1] for g in self.decodes)
        slots = torch.cat([F.pad(g.slots, (0, width - g.slots.shape[1])) for g in self.decodes])
        return slots, torch.tensor([n for g in self.decodes for n in g.lengths])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = False  # prefill-sized calls in C, rows in parallel (set by Llama.attach_native)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.dim() == 2 and x.shape[0] >= ELEMENTWISE_ROWS
        if self.native and rows and x.dtype == torch.float32 and x.is_contiguous():
            return rms_norm_rows(x, self.weight, self.eps)
        if x.dtype == torch.float32 and x.device.type == "cpu":
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op: decode is op-bound
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) per position [context, D]; the sine's first half is negated for `apply_rope`."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    pos = torch.arange(config.context_length, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : dim // 2].neg_()
    return emb.cos().to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin from `rope_tables`: [T, D] or [T, 1, D].

    Hugging Face Llama's rotate-half form, x * cos + cat(-x2, x1) * sin, computed as x * cos + cat(x2, x1) * sin'
    with sin' = cat(-sin1, sin2): the same products and sums, so the same bits, in three operators instead of
    five (decode steps are bound by the operator count).
    """
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_heads
        self.n_kv = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.wqkv = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=False)
        self.wo = nn.Linear(config.q_size, config.hidden_size, bias=False)
        # Kept beside the projection, not in it: the float16 and native linear layers that replace wqkv carry none.
        self.qkv_bias: nn.Parameter | None = None
        if config.attention_bias:
            self.qkv_bias = nn.Parameter(torch.zeros(config.q_size + 2 * config.kv_size), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.wqkv(x)
        if self.qkv_bias is not None:
            qkv.add_(self.qkv_bias)  # (the projection's output is a fresh tensor)
        # Queries and keys are adjacent columns: one rotary call for both (decode is bound by the op count).
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.n_heads + self.n_kv, self.head_dim)
        rows = meta.native_prefill and t >= ELEMENTWISE_ROWS and qkv.dtype == torch.float32
        # in C, in place, rows in parallel (the same products and sums), or torch's operators
        if not (rows and qkv.is_contiguous() and cos.dim() == 3 and rope_rows_(qk, cos[:, 0], sin[:, 0])):
            qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.n_kv, self.head_dim)
        # a float16 cache (--kv-cache-dtype) rounds K and V as they are stored; reads convert back
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        if not meta.prefills and meta.decode_table is not None:  # a decode step, attention in C (native.py)
            att = torch.empty((t, self.n_heads, self.head_dim))
            decode_attention(q, k_cache, v_cache, *meta.decode_table, att)
            return self.wo(att.view(t, self.q_size))
        if not meta.prefills and len(meta.decodes) == 1 and meta.decodes[0].mask is None:  # the common decode step
            return self.wo(self._decode(q, k_cache, v_cache, meta.decodes[0]).reshape(t, self.q_size))
        out = torch.empty_like(q)
        for span in meta.prefills:
            if span.sparse and meta.sparse_patterns is not None:
                out[span.start : span.end] = self._sparse_prefill(q, k, v, k_cache, v_cache, span, meta)
                continue
            if meta.native_prefill and span.context_len <= prefill_keys():
                if span.context_slots is None:
                    ks, vs = k[span.start : span.end], v[span.start : span.end]
                else:
                    ks, vs = (
                        _gather(k_cache, span.context_slots, q.dtype),
                        _gather(v_cache, span.context_slots, q.dtype),
                    )
                if prefill_attention(q[span.start : span.end], ks, vs, out[span.start : span.end]):
                    continue
            qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if span.context_slots is None:
                ks, vs = k[span.start : span.end], v[span.start : span.end]
            else:  # query i of the chunk sits at context position context_len - n + i and sees keys up to it
                ks = _gather(k_cache, span.context_slots, q.dtype)
                vs = _gather(v_cache, span.context_slots, q.dtype)
            o = bottom_right_causal(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0))
            out[span.start : span.end] = o.squeeze(0).transpose(0, 1)
        if meta.decode_table is not None:
            first = meta.decodes[0].start
            decode_attention(q[first:], k_cache, v_cache, *meta.decode_table, out[first:])
        else:
            for group in meta.decodes:
                out[group.start : group.end] = self._decode(q, k_cache, v_cache, group)
        return self.wo(out.reshape(t, self.q_size))

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup
    ) -> torch.Tensor:
        """Attention of one decode group's single-token queries: [B, H, D].

        The query heads that share a KV head become that head's query rows ([B, Hkv, H / Hkv, D]): the same
        attention as grouped-query SDPA, without it expanding K and V per query head (10-15% faster on CPU).
        """
        b, length = group.slots.shape
        qd = q[group.start : group.end].view(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        # index_select over flat slots is several times faster on CPU than advanced indexing with [B, L].
        flat = group.slots.reshape(-1)
        kd = _gather(k_cache, flat, q.dtype).view(b, length, self.n_kv, self.head_dim).transpose(1, 2)
        vd = _gather(v_cache, flat, q.dtype).view(b, length, self.n_kv, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask)
        return o.reshape(b, self.n_heads, self.head_dim)

    def _sparse_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        span: PrefillSpan,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        assert meta.sparse_patterns is not None
        n = span.end - span.start
        if span.context_slots is None:
            ks, vs = k[span.start : span.end], v[span.start : span.end]
        else:
            ks, vs = _gather(k_cache, span.context_slots, q.dtype), _gather(v_cache, span.context_slots, q.dtype)
        patterns = meta.sparse_patterns[self.layer]
        if q.is_cuda:  # Triton kernels over device-built indices
            return sparse_prefill_attention_triton(q[span.start : span.end], ks, vs, span.context_len - n, patterns)
        out, _ = sparse_prefill_attention(
            q[span.start : span.end], ks, vs, span.context_len - n, patterns, native=meta.native_prefill
        )
        return out


class MLP(nn.Module):
    # Gate and up stay two matmuls: on CPU the fused [2 * inter, hidden] weight falls out of cache and runs
    # about half as fast as the two halves (measured with SmolLM2 shapes on AVX2).
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w_up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.native = False  # prefill-sized SiLU x up in C (set by Llama.attach_native)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: no two more [rows, inter] tensors to allocate and fault in (a prefill chunk's are 12 MB each)
        g, u = self.w_gate(x), self.w_up(x)
        if self.native and g.shape[0] >= ELEMENTWISE_ROWS and g.dtype == u.dtype == torch.float32:
            return self.w_down(silu_mul_(g.contiguous(), u.contiguous()))
        return self.w_down(F.silu(g, inplace=True).mul_(u))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def linears(self) -> list[tuple[nn.Module, str]]:
        """(owner, attribute) of each linear layer, for swapping in reduced-precision ones."""
        return [(self.attn, "wqkv"), (self.attn, "wo"), (self.mlp, "w_gate"), (self.mlp, "w_up"), (self.mlp, "w_down")]


class Llama(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if torch.empty(0).is_meta:  # for_weights: no random init (normal_ on meta tensors imports torch._dynamo, ~1 s)
            self.embed = nn.Embedding(
                config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
            )
        else:
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head_fast: NativeLinear | Fp16Linear | None = None  # set by use_native / use_fp16
        self.native_decoder: NativeDecoder | None = None  # set by attach_native
        self.native_attention = False  # set by attach_native
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @classmethod
    def for_weights(cls, config: ModelConfig) -> Llama:
        """A model whose parameters hold no values yet, for `load_weights` (which sets every one) to fill: built on
        the meta device and given uninitialized CPU memory, skipping the default random initialization that the
        load would overwrite (0.6 s of engine start for SmolLM2 here, and it grows with the model)."""
        with torch.device("meta"):
            model = cls(config)
        # (not Module.to_empty: its empty_like of meta tensors imports torch's symbolic-shape machinery, 0.3 s)
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype), param.requires_grad))
            for name, buffer in list(module.named_buffers(recurse=False)):
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
        return model

    def blocks(self) -> list[Block]:
        return [b for b in self.layers if isinstance(b, Block)]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Takes the loader's parameter names and fuses wq/wk/wv into one matmul."""
        expected = {"embed", "norm"} | ({"lm_head"} if self.lm_head is not None else set())
        for i in range(self.config.num_layers):
            names: tuple[str, ...] = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
            if self.config.attention_bias:
                names += ("bq", "bk", "bv")
            expected |= {f"layers.{i}.{n}" for n in names}
        missing = sorted(expected - weights.keys())
        if missing:
            raise ValueError(f"model weights lack {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            self._copy(self.embed.weight, weights["embed"], "embed")
            self._copy(self.norm.weight, weights["norm"], "norm")
            if self.lm_head is not None:
                self._copy(self.lm_head.weight, weights["lm_head"], "lm_head")
            for i, block in enumerate(self.layers):
                assert isinstance(block, Block)
                w = {n: weights[f"layers.{i}.{n}"] for n in ("wq", "wk", "wv")}
                self._copy(block.attn_norm.weight, weights[f"layers.{i}.attn_norm"], f"layers.{i}.attn_norm")
                self._copy(block.attn.wqkv.weight, torch.cat([w["wq"], w["wk"], w["wv"]]), f"layers.{i}.wqkv")
                if block.attn.qkv_bias is not None:
                    b = [weights[f"layers.{i}.{n}"] for n in ("bq", "bk", "bv")]
                    self._copy(block.attn.qkv_bias, torch.cat(b), f"layers.{i}.qkv_bias")
                self._copy(block.attn.wo.weight, weights[f"layers.{i}.wo"], f"layers.{i}.wo")
                self._copy(block.ffn_norm.weight, weights[f"layers.{i}.ffn_norm"], f"layers.{i}.ffn_norm")
                self._copy(block.mlp.w_gate.weight, weights[f"layers.{i}.w_gate"], f"layers.{i}.w_gate")
                self._copy(block.mlp.w_up.weight, weights[f"layers.{i}.w_up"], f"layers.{i}.w_up")
                self._copy(block.mlp.w_down.weight, weights[f"layers.{i}.w_down"], f"layers.{i}.w_down")

    @staticmethod
    def _copy(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"weight {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        param.copy_(value)

    def use_native(self, blocks: dict[str, NativeWeight], fp16: bool, int8: bool = False) -> int:
        """Linear layers stored as Q4_0/Q4_1/Q8_0 read those blocks with the native kernels (native.py) in calls of
        a few rows; larger calls (prefill chunks, big decode batches) use float16 weights if `fp16`, else the
        float32 ones; from WIDEN_ROWS rows, float32 over the widened blocks, or int8 activations if `int8` (where the
        layout allows: native.int8_supported). Returns how many layers read their blocks (QKV counts once; it is
        fused only if all three are stored as blocks of one kind)."""
        jobs: list[tuple[nn.Module, str, Callable[[], nn.Module]]] = []
        for i, block in enumerate(self.layers):
            assert isinstance(block, Block)
            key = f"layers.{i}."
            for owner, attr in block.linears():
                weight = getattr(owner, attr).weight
                if attr == "wqkv":
                    qkv = [blocks[key + n] for n in ("wq", "wk", "wv") if key + n in blocks]
                    fusable = len(qkv) == 3 and len({w.kind for w in qkv}) == 1
                    native = NativeWeight.concat(qkv) if fusable else None
                else:
                    native = blocks.get(key + attr)
                if native is not None:
                    jobs.append((owner, attr, functools.partial(self._native, native, weight, fp16, int8)))
                elif fp16:
                    jobs.append((owner, attr, functools.partial(Fp16Linear, weight)))
        # packing (int8 panels, fbgemm's float16 prepack) leaves the GIL: the layers pack in parallel
        with ThreadPoolExecutor(max(1, min(8, torch.get_num_threads()))) as pool:
            built = list(pool.map(lambda job: job[2](), jobs))
        for (owner, attr, _), module in zip(jobs, built, strict=True):
            setattr(owner, attr, module)
        swapped = sum(isinstance(m, NativeLinear) for m in built)
        head = self.lm_head if self.lm_head is not None else self.embed
        name = "lm_head" if self.lm_head is not None else "embed"
        if name in blocks:
            # no fallback: over the vocabulary the native kernels beat fbgemm's float16 GEMM at every row count
            # (1.15-1.7x from 1 to 512 rows on a 2-core AVX2 CPU), and keeping no float16 copy saves its memory
            self.head_fast = NativeLinear(blocks[name])
            swapped += 1
        elif fp16:
            self.head_fast = Fp16Linear(head.weight)
        return swapped

    @classmethod
    def _native(cls, native: NativeWeight, weight: torch.Tensor, fp16: bool, int8: bool) -> NativeLinear:
        return NativeLinear(native, cls._fallback(weight, fp16), int8=int8)

    @staticmethod
    def _fallback(weight: torch.Tensor, fp16: bool) -> nn.Module:
        if fp16:
            return Fp16Linear(weight)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return linear

    def use_fp16(self) -> None:
        """Swaps every linear layer and the vocabulary projection for float16-weight ones (CPU; see Fp16Linear)."""
        for block in self.layers:
            assert isinstance(block, Block)
            for owner, attr in block.linears():
                setattr(owner, attr, Fp16Linear(getattr(owner, attr).weight))
        head = self.lm_head if self.lm_head is not None else self.embed
        self.head_fast = Fp16Linear(head.weight)

    def attach_native(self, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Native kernels over `kv_cache` (call after init_rope, where native.library() loads): decode attention
        reads the CPU cache (float32, or float16 where the kernels convert it) in C, and decode steps of up to 64
        sequences run all layers in one C call where every linear layer reads native blocks (after use_native).
        Returns whether the latter will."""
        dtypes = kv_dtypes()
        self.native_attention = (
            all(t.dtype in dtypes and t.device.type == "cpu" and t.is_contiguous() for kv in kv_cache for t in kv)
            and len({t.dtype for kv in kv_cache for t in kv}) == 1
            and self.config.num_heads % self.config.num_kv_heads == 0
        )
        for module in self.modules():  # prefill chunks' norms and SiLU in C where the activations are float32 here
            if isinstance(module, RMSNorm | MLP):
                module.native = self.native_attention
        self.native_decoder = (
            NativeDecoder(self, kv_cache) if self.native_attention and NativeDecoder.supports(self) else None
        )
        return self.native_decoder is not None

    def attach_lora(self) -> None:
        """Wraps every linear layer of the blocks so that steps with LoRA rows add the adapters' updates (call
        after use_native / use_fp16 / attach_native: those read or replace the plain layers)."""
        native = self.config.num_layers if self.native_decoder is not None else 0  # (its float16 adapters)
        for i, block in enumerate(self.blocks()):
            for owner, attr in block.linears():
                layer = getattr(owner, attr)
                if not isinstance(layer, LoraLinear):
                    setattr(owner, attr, LoraLinear(layer, i, attr, native))

    def _native_layers(
        self, x: torch.Tensor, meta: AttentionMeta, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor | None:
        """The hidden states after the last layer from the native decoder, or None where it does not apply."""
        decoder = self.native_decoder
        if decoder is None or kv_cache is not decoder.kv_cache or meta.prefills or x.shape[0] > decoder.max_rows:
            return None
        slots, lens = meta.build_decode_table()
        return decoder.run(x, meta.positions, meta.slot_mapping, slots, lens, meta.lora)

    def init_rope(self) -> None:
        """Computes the rotary tables on the model's device and dtype (call after .to())."""
        cos, sin = rope_tables(self.config, self.embed.weight.device, self.embed.weight.dtype)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(
        self, tokens: torch.Tensor, meta: AttentionMeta, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """tokens: [T]; returns logits [len(meta.logits_rows), vocab] in float32."""
        x = self.embed(tokens)
        native = self._native_layers(x, meta, kv_cache)
        if native is not None:
            x = native
        else:
            meta.decode_table = meta.build_decode_table() if self.native_attention and meta.decodes else None
            meta.native_prefill = self.native_attention
            cos = self.rope_cos[meta.positions].unsqueeze(1)  # [T, 1, D]: broadcast over heads
            sin = self.rope_sin[meta.positions].unsqueeze(1)
            with int8_rows([(p.start, p.end) for p in meta.prefills if p.int8]), lora_rows(meta.lora):
                for block, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
                    assert isinstance(block, Block)
                    x = x + block.attn(block.attn_norm(x), cos, sin, k_cache, v_cache, meta)
                    x = x + block.mlp(block.ffn_norm(x))
        x = self.norm(x[meta.logits_rows])
        if self.head_fast is not None:
            return self.head_fast(x).float()
        head = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        if x.device.type != "cpu":
            return F.linear(x, head).float()
        # On CPU the vocabulary projection runs ~1.5x faster in row chunks that stay in cache.
        out = torch.empty((x.shape[0], head.shape[0]), dtype=torch.float32)
        for start in range(0, head.shape[0], _HEAD_CHUNK):
            out[:, start : start + _HEAD_CHUNK] = F.linear(x, head[start : start + _HEAD_CHUNK])
        return out


@torch.inference_mode()
def prompt_logits(model: Llama, tokens: list[int], int8: bool = False, every_position: bool = False) -> torch.Tensor:
    """Next-token logits after `tokens` [vocab] (every_position: after each prefix, [n, vocab]), from one dense
    prefill into a scratch cache (for checks); `int8`: as the engine prefills a long prompt with --prefill-gemm int8."""
    config = model.config
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    n = len(tokens)
    shape = (n, config.num_kv_heads, config.head_dim)
    cache = [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))]
    idx = torch.arange(n, device=device)
    meta = AttentionMeta(idx, idx, [PrefillSpan(0, n, None, n, int8=int8)], [], idx if every_position else idx[-1:])
    # One scratch pair serves every layer: a whole-context prefill attends to its fresh K/V, not the cache.
    logits = model(torch.tensor(tokens, device=device), meta, cache * config.num_layers)
    return logits if every_position else logits[0]
