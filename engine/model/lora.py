"""LoRA adapters: many fine-tunes of one base model served together, each request choosing one (or none).

An adapter adds a low-rank update to some linear layers: y = W x + s * B (A x), A [r, in], B [out, r], s its
scale (alpha / r, or alpha / sqrt(r) with rsLoRA). The base weights are never merged, so one batch mixes requests
of several adapters and of the base model: each linear layer computes the base product for every row, then the
step's adapters' thin products, each applied to its own rows (`LoraLinear`: the C decoder's code on CPU int4
engines, else the adapters stacked side by side, `Stack`). With ranks of 8-64 against hidden sizes in the hundreds
or thousands that is a few percent of the layer's work per adapter.

Files are PEFT's (`adapter_config.json` + `adapter_model.safetensors`, as `save_pretrained` writes them and the
Hub serves them), for the attention and MLP projections of Llama, Mistral and Qwen2 models (q/k/v/o_proj,
gate/up/down_proj). What this engine cannot apply exactly is refused when the adapter loads, naming it: DoRA,
trained biases, embedding or output-layer adapters (`modules_to_save`), other target modules.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig

# PEFT module name -> (our linear layer, part of it); q/k/v are one fused projection here, in that order
_MODULES = {
    "q_proj": ("wqkv", 0),
    "k_proj": ("wqkv", 1),
    "v_proj": ("wqkv", 2),
    "o_proj": ("wo", 0),
    "gate_proj": ("w_gate", 0),
    "up_proj": ("w_up", 0),
    "down_proj": ("w_down", 0),
}
SLOTS = ("wqkv", "wo", "w_gate", "w_up", "w_down")
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_ids = itertools.count(1)


class AdapterError(ValueError):
    """An adapter cannot be loaded (missing or unreadable files, a configuration or tensors this engine cannot
    apply, shapes that do not fit the model); the message names the file and the problem."""


@dataclass
class LoraAdapter:
    """A loaded adapter: per layer, per linear layer it changes, (A [R, in], B [out, R]) with the scale folded into
    B; for the fused QKV projection, A stacks the q/k/v parts' A and B is block-diagonal over them."""

    name: str
    path: Path
    rank: int  # the largest rank of its modules
    weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    id: int = field(default_factory=lambda: next(_ids))  # unique per load: prefix-cache keys use it
    native: Any = field(default=None, repr=False, compare=False)  # its table for the C decoder (native.py), built once

    @property
    def hash_root(self) -> bytes:
        """What its requests' prefix-cache hashes start from: K/V computed with this load of this adapter."""
        return f"lora:{self.id}".encode()

    @property
    def width(self) -> int:
        """The most rows of A in one linear layer (the fused QKV projection stacks up to three modules' ranks)."""
        return max((a.shape[0] for layer in self.weights for a, _ in layer.values()), default=0)

    @property
    def device(self) -> torch.device:
        return next((a.device for layer in self.weights for a, _ in layer.values()), torch.device("cpu"))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.weights for pair in layer.values() for t in pair)


def _outputs(config: ModelConfig, slot: str) -> list[int]:
    """Sizes of the parts of a linear layer's output (q, k, v for the fused projection)."""
    if slot == "wqkv":
        return [config.q_size, config.kv_size, config.kv_size]
    return [config.intermediate_size if slot in ("w_gate", "w_up") else config.hidden_size]


def _input(config: ModelConfig, slot: str) -> int:
    return config.intermediate_size if slot == "w_down" else config.q_size if slot == "wo" else config.hidden_size


def _pattern(patterns: dict[str, object], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the module name's end."""
    for key, value in patterns.items():
        try:
            found = re.match(rf"(.*\.)?({key})$", module)
        except re.error as exc:
            raise AdapterError(f"alpha_pattern key {key!r} is not a regular expression ({exc})") from exc
        if found:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise AdapterError(f"alpha_pattern[{key!r}] must be a number, got {value!r}")
            return float(value)
    return default


def load_adapter(
    name: str,
    path: str | Path,
    config: ModelConfig,
    max_rank: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """Reads a PEFT LoRA adapter directory for a model of `config`; raises AdapterError naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: {config_file} does not exist (a PEFT LoRA adapter directory has it)")
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: {config_file} is not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter {name!r}: {config_file} is not a JSON object")
    peft_type = str(meta.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type} is not supported (only LORA)")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "lora_bias": "LoRA biases (lora_bias) are not supported",
        "modules_to_save": "adapters that retrain whole modules (modules_to_save) are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts) does not apply to Llama-family models",
    }
    for key, problem in refused.items():
        if meta.get(key):
            raise AdapterError(f"adapter {name!r}: {problem} ({key} = {meta[key]!r})")
    if meta.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias = {meta['bias']!r} is not supported (only 'none')")
    alpha = meta.get("lora_alpha", meta.get("r", 8))
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"adapter {name!r}: lora_alpha must be a number, got {alpha!r}")
    rslora = bool(meta.get("use_rslora", False))
    alpha_pattern = meta.get("alpha_pattern") or {}

    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        binary = (folder / "adapter_model.bin").is_file()
        hint = " (a .bin adapter: re-save it with safe_serialization=True)" if binary else ""
        raise AdapterError(f"adapter {name!r}: {weights_file} does not exist{hint}")
    try:
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"adapter {name!r}: {weights_file} is not a readable safetensors file ({exc})") from exc

    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        module = m.group(2) if m else None
        if m is None or module not in _MODULES:
            what = f"module {module!r}" if module else f"tensor {key!r}"
            raise AdapterError(
                f"adapter {name!r}: {what} is not supported (adapters may change q/k/v/o_proj and gate/up/down_proj)"
            )
        layer = int(m.group(1))
        if layer >= config.num_layers:
            raise AdapterError(f"adapter {name!r}: {key} is for layer {layer}; the model has {config.num_layers}")
        parts.setdefault((layer, module), {})[m.group(3)] = tensor
    if not parts:
        raise AdapterError(f"adapter {name!r}: {weights_file} holds no LoRA weights")

    weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(config.num_layers)]
    grouped: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    rank = 0
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"].float(), ab["B"].float()
        slot, part = _MODULES[module]
        want_in, want_out = _input(config, slot), _outputs(config, slot)[part]
        r = a.shape[0] if a.dim() == 2 else 0
        if r < 1 or b.dim() != 2 or a.shape[1] != want_in or b.shape != (want_out, r):
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"this model needs [r, {want_in}] and [{want_out}, r] (an adapter for another base model?)"
            )
        if r > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {r} ({module}) is above max_lora_rank {max_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} holds non-finite values")
        module_name = f"model.layers.{layer}.{'self_attn' if slot in ('wqkv', 'wo') else 'mlp'}.{module}"
        module_alpha = _pattern(alpha_pattern, module_name, float(alpha))
        scale = module_alpha / (math.sqrt(r) if rslora else r)
        rank = max(rank, r)
        grouped.setdefault((layer, slot), []).append((part, a, b * scale))
    for (layer, slot), pieces in grouped.items():
        sizes = _outputs(config, slot)
        a = torch.cat([p[1] for p in pieces])
        b = torch.zeros(sum(sizes), a.shape[0])
        col = 0
        for part, _, bp in pieces:  # block-diagonal: each part's B writes only its own rows of the fused output
            row = sum(sizes[:part])
            b[row : row + bp.shape[0], col : col + bp.shape[1]] = bp
            col += bp.shape[1]
        weights[layer][slot] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    return LoraAdapter(name=name, path=folder, rank=rank, weights=weights)


class Stack:
    """Adapters side by side, per linear layer: A [W, in] holds each adapter's rows at its own offset (zero-padded to
    its widest such layer), B [out, W] its columns, `owners[slot]` [W] which adapter each column belongs to. One
    matmul pair then serves every adapter of a step (its rows' other columns masked to zero): a linear layer costs
    three operators however many adapters the step mixes, instead of four per adapter."""

    def __init__(self, adapters: tuple[LoraAdapter, ...]) -> None:
        self.adapters = adapters
        self.pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.owners: dict[str, torch.Tensor] = {}
        layers = len(adapters[0].weights)
        device = adapters[0].device
        for slot in SLOTS:
            widths = [max((w[slot][0].shape[0] for w in a.weights if slot in w), default=0) for a in adapters]
            if not any(widths):
                continue
            index = torch.arange(len(adapters))
            self.owners[slot] = torch.repeat_interleave(index, torch.tensor(widths)).to(device)
            for layer in range(layers):
                present = [(i, a.weights[layer][slot]) for i, a in enumerate(adapters) if slot in a.weights[layer]]
                if not present:
                    continue
                a0, b0 = present[0][1]
                a_cat = a0.new_zeros(sum(widths), a0.shape[1])
                b_cat = b0.new_zeros(b0.shape[0], sum(widths))
                for i, (a, b) in present:
                    at = sum(widths[:i])
                    a_cat[at : at + a.shape[0]] = a
                    b_cat[:, at : at + b.shape[1]] = b
                self.pairs[layer, slot] = (a_cat, b_cat)


_STACKS: collections.OrderedDict[tuple[int, ...], Stack] = collections.OrderedDict()
# recent compositions (a running batch's set of adapters changes as requests come and go); each holds a copy of its
# adapters' weights, memory the KV cache was not sized around: keep few
_STACKS_KEPT = 2


def _stack_of(adapters: tuple[LoraAdapter, ...]) -> Stack:
    key = tuple(a.id for a in adapters)
    stack = _STACKS.pop(key, None) or Stack(adapters)
    _STACKS[key] = stack
    while len(_STACKS) > _STACKS_KEPT:
        _STACKS.popitem(last=False)
    return stack


@dataclass
class LoraBatch:
    """A step's rows by adapter: (adapter, its rows in the packed batch), and each row's adapter as an index into
    `parts` (-1: the base model)."""

    parts: list[tuple[LoraAdapter, list[int]]]
    owner: torch.Tensor  # [rows]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    native: Any = None  # the step's table for the C updates (native.py), built on first use

    @classmethod
    def of_rows(cls, adapters: Sequence[LoraAdapter | None], device: torch.device) -> LoraBatch | None:
        """From each packed row's adapter (None = the base model); None when no row has one."""
        rows: dict[int, tuple[LoraAdapter, list[int]]] = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                rows.setdefault(adapter.id, (adapter, []))[1].append(i)
        if not rows:
            return None
        owner = [-1] * len(adapters)
        for index, (_, idx) in enumerate(rows.values()):
            for i in idx:
                owner[i] = index
        return cls(list(rows.values()), torch.tensor(owner, dtype=torch.long).to(device, non_blocking=True))

    def update(
        self, layer: int, slot: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A [W, in], B [out, W], mask [rows, W]) of a linear layer for this step's adapters; None if none changes
        it."""
        stack = _stack_of(tuple(a for a, _ in self.parts))
        pair = stack.pairs.get((layer, slot))
        if pair is None:
            return None
        mask = self.masks.get(slot)
        if mask is None:
            mask = self.masks[slot] = (self.owner[:, None] == stack.owners[slot][None, :]).to(dtype)
        return pair[0], pair[1], mask


_active = threading.local()


@contextlib.contextmanager
def lora_rows(batch: LoraBatch | None) -> Iterator[None]:
    """Within: the model's LoraLinear layers add each adapter's update to its rows of `batch`."""
    was = getattr(_active, "batch", None)
    _active.batch = batch
    try:
        yield
    finally:
        _active.batch = was


class LoraLinear(nn.Module):
    """A linear layer (any of the engine's kinds) plus, inside `lora_rows`, the adapters' low-rank updates."""

    def __init__(self, base: nn.Module, layer: int, slot: str, native_layers: int = 0) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.slot = slot
        # the model's layer count where the updates of steps of a few rows run in C (an int4 engine: the decoder's
        # code and float16 weights for prefill too); 0: torch's operators over the adapters' own weights
        self.native_layers = native_layers

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch: LoraBatch | None = getattr(_active, "batch", None)
        if batch is None:
            return y
        if self.native_layers:
            from .native import lora_linear_

            if lora_linear_(batch, self.native_layers, self.layer, self.slot, x, y):
                return y
        update = batch.update(self.layer, self.slot, x.dtype)
        if update is None:
            return y
        a, b, mask = update
        y += ((x.to(a.dtype) @ a.t()).mul_(mask) @ b.t()).to(y.dtype)
        return y
