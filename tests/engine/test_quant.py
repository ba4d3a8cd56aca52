"""Reduced-precision weights: GGUF blocks are kept exactly and the native kernels do float32 arithmetic on them;
the float16 path stays close to float; both answer like the float path."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from optimist.engine.bench.prefill import passkey_prompt, repeats_for
from optimist.engine.bench.prefill_gemm import default_text
from optimist.engine.config import ConfigError, EngineConfig
from optimist.engine.engine import Engine
from optimist.engine.model import native
from optimist.engine.model.llama import prompt_logits
from optimist.engine.model.native import NativeLinear, NativeWeight
from optimist.engine.model.quant import Fp16Linear, fp16_available
from optimist.engine.request import SamplingParams

needs_fp16 = pytest.mark.skipif(not fp16_available(), reason="torch has no fbgemm float16 GEMM")
needs_native = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_gguf_blocks_are_kept_exactly(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    n, k = 96, 128
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    reference = gguf.quants.dequantize(raw, qtype).reshape(n, k)
    weight = NativeWeight.from_gguf(raw, int(qtype), n, k)
    assert weight.shape == (n, k)
    assert np.array_equal(weight.dequantize(), reference)
    # rows permute together (the loader undoes llama.cpp's rotary row order this way)
    flipped = weight.map_rows(lambda a: a[::-1])
    assert np.array_equal(flipped.dequantize(), reference[::-1])
    both = NativeWeight.concat([weight, flipped])
    assert np.array_equal(both.dequantize(), np.concatenate([reference, reference[::-1]]))


def test_unsupported_block_types_are_refused() -> None:
    raw = gguf.quants.quantize(np.ones((4, 64), dtype=np.float32), T.Q5_0)
    with pytest.raises(ValueError, match="no native kernel"):
        NativeWeight.from_gguf(raw, int(T.Q5_0), 4, 64)
    with pytest.raises(ValueError, match="different block types"):
        q4 = NativeWeight.from_gguf(gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q4_1), int(T.Q4_1), 4, 64)
        q8 = NativeWeight.from_gguf(gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q8_0), int(T.Q8_0), 4, 64)
        NativeWeight.concat([q4, q8])


@needs_native
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 11, 33, 150])  # >4: the panel kernel; 150: two row blocks
def test_native_kernel_is_float_arithmetic_on_the_files_weights(qtype: T, rows: int) -> None:
    rng = np.random.default_rng(rows)
    n, k = 74, 224  # k: 7 blocks (odd, so no pairing of blocks is assumed); n: not a whole number of panels
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).copy())
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = NativeLinear(NativeWeight.from_gguf(raw, int(qtype), n, k))(x)  # no fallback: every row natively
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    exact = x.double() @ w.double().t()
    # float32 products and sums of the exact weights: the error is float32 rounding over k terms, as in x @ w.T
    bound = 8 * k * 2**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((x @ w.t()).double() - exact).abs().max() <= bound.max()  # the same bound holds for torch's float32


@needs_native
def test_native_linear_hands_large_calls_to_its_fallback() -> None:
    raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32), T.Q4_1)
    w = torch.from_numpy(gguf.quants.dequantize(raw, T.Q4_1).reshape(40, 64).copy())
    fallback = torch.nn.Linear(64, 40, bias=False)
    fallback.weight.data = -w  # a different answer, to tell which path ran
    layer = NativeLinear(NativeWeight.from_gguf(raw, int(T.Q4_1), 40, 64), fallback, native_rows=4)
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x[:4]), x[:4] @ w.t(), atol=1e-4)
    assert torch.equal(layer(x), fallback(x))


@needs_native
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0])
def test_native_linear_widens_its_blocks_for_prefill_sized_calls(qtype: T) -> None:
    """From WIDEN_ROWS rows a layer runs torch's float32 GEMM over its blocks widened for the call: the file's
    weights exactly (not the fallback's), nothing kept between calls."""
    n, k = 48, 96
    raw = gguf.quants.quantize(np.random.default_rng(1).standard_normal((n, k)).astype(np.float32), qtype)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).copy())
    fallback = torch.nn.Linear(k, n, bias=False)
    fallback.weight.data = -w  # a different answer, to tell which path ran
    layer = NativeLinear(NativeWeight.from_gguf(raw, int(qtype), n, k), fallback, native_rows=4)
    assert torch.allclose(layer.widened(), w, rtol=1e-6, atol=1e-7)  # the blocks' values (d * q + z, fused)
    x = torch.randn(native.WIDEN_ROWS, k, generator=torch.Generator().manual_seed(2))
    exact = x.double() @ w.double().t()
    got = layer(x)
    assert ((got.double() - exact).abs() <= 8 * k * 2**-24 * (x.double().abs() @ w.double().abs().t()) + 1e-6).all()
    assert torch.equal(layer(x[:-1]), fallback(x[:-1]))  # one row fewer: the fallback
    kept = [t for t in vars(layer).values() if isinstance(t, torch.Tensor) and t.dtype == torch.float32]
    assert sum(t.numel() for t in kept) < n * k  # only the blocks' scales: no float32 copy of the weights


def test_native_build_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPTIMIST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "cc"))
    (tmp_path / "cc").write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    (tmp_path / "cc").chmod(0o755)
    with pytest.raises(native.NativeUnavailable, match=r"building the native CPU kernels .* failed: cc: error"):
        native.build()
    assert not list(tmp_path.rglob("*.so"))  # no partial library left behind


@needs_native
@pytest.mark.slow
def test_int4_engine_answers_like_the_float_engine(engine: Engine, model_path: Path) -> None:
    fast = Engine(EngineConfig(model=model_path, device="cpu", kv_cache_tokens=4096))  # weights=auto
    try:
        assert fast.weights == "int4"  # what auto picks for a GGUF of Q4_1/Q8_0 blocks where the kernels build
        assert isinstance(fast.model.head_fast, NativeLinear)
        assert fast.model.native_decoder is not None  # decode steps of a few sequences: one C call
        assert all(isinstance(m, NativeLinear) for b in fast.model.layers for m in (b.attn.wqkv, b.mlp.w_down))
        prompts = ["The capital of France is", "def fibonacci(n):", "1, 1, 2, 3, 5,"]
        prompts.append(fast.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
        for text in prompts:
            ids = engine.tokenizer.encode(text)
            params = SamplingParams(temperature=0, max_tokens=16)
            exact = engine.generate(engine.new_request(ids, params))
            got = fast.generate(fast.new_request(ids, params))
            assert got[:2] == exact[:2], text
            # Prompts of up to 4 tokens run every matmul natively (longer ones are prefilled with the fallback):
            # the file's weights exactly and float32 arithmetic, so logits agree to float32 rounding (fp16: ~0.1%).
            logits = prompt_logits(engine.model, ids[:4]).cpu()  # the engine fixture is on the GPU where there is one
            diff = (prompt_logits(fast.model, ids[:4]) - logits).abs().max().item()
            assert diff < 1e-4 * logits.abs().max().item(), (text, diff)
    finally:
        fast.shutdown()


@needs_fp16
@pytest.mark.parametrize("rows", [1, 8, 33, 700])
def test_fp16_linear_is_float_arithmetic_on_rounded_weights(rows: int) -> None:
    torch.manual_seed(rows)
    w = torch.randn(96, 160)
    x = torch.randn(rows, 160)
    got = Fp16Linear(w)(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    exact_rounded = (x.double() @ w.half().double().t()).float()
    # float32 sums of float32 activations times the float16-rounded weights: float32 rounding only ...
    assert torch.allclose(got, exact_rounded, rtol=1e-5, atol=1e-4)
    # ... and the rounding of the weights is the whole difference from float32 weights
    exact = x @ w.t()
    assert (got - exact).abs().max().item() < 2**-10 * (x.abs() @ w.abs().t()).max().item()
    assert not torch.equal(got, exact)


@needs_fp16
@pytest.mark.slow
def test_fp16_engine_answers_like_the_float_engine(engine: Engine, model_path: Path) -> None:
    fast = Engine(EngineConfig(model=model_path, device="cpu", weights="fp16", kv_cache_tokens=4096))  # CPU kernels
    try:
        prompts = ["The capital of France is", "def fibonacci(n):", "1, 1, 2, 3, 5,"]
        prompts.append(fast.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
        for text in prompts:
            ids = engine.tokenizer.encode(text)
            params = SamplingParams(temperature=0, max_tokens=16)
            exact = engine.generate(engine.new_request(ids, params))
            approx = fast.generate(fast.new_request(ids, params))
            assert approx[:2] == exact[:2], text
            logits = prompt_logits(engine.model, ids).cpu()  # the engine fixture is on the GPU where there is one
            diff = (prompt_logits(fast.model, ids) - logits).abs().max().item()
            # float16 weights move logits by ~0.1% of their range (the int4 path by 1-2%)
            assert diff < 0.004 * logits.abs().max().item(), (text, diff)
    finally:
        fast.shutdown()


def test_auto_weights_pick_fp16_for_float_tensors_and_float_where_it_would_change_the_arithmetic(
    tiny_gguf: Path,
) -> None:
    # the tiny GGUF holds float32 tensors: no blocks for the native kernels
    chosen = {}
    for dtype in ("auto", "bfloat16"):
        eng = Engine(EngineConfig(model=tiny_gguf, device="cpu", dtype=dtype, kv_cache_tokens=256))
        chosen[dtype] = eng.weights
        eng.shutdown()
    assert chosen == {"auto": "fp16" if fp16_available() else "float", "bfloat16": "float"}


def _q4_layer(n: int, k: int, seed: int, qtype: T = T.Q4_1) -> tuple[NativeWeight, torch.Tensor]:
    raw = gguf.quants.quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32), qtype)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).copy())
    return NativeWeight.from_gguf(raw, int(qtype), n, k), w


def _int8_reference(weight: NativeWeight, x: torch.Tensor) -> torch.Tensor:
    """The int8 GEMM's arithmetic in float64: each block of 32 activations rounded to int8 with scale max|x| / 127
    (as the kernel does, in float32), times the 4-bit values; the offsets times the exact block sums."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    xq = torch.round(blocks * inv[..., None]).double()  # float32 product, rounded half to even like the kernel
    dx = (amax / torch.tensor(127.0)).double()
    q = torch.from_numpy(weight.values().astype(np.float64)).view(-1, k // 32, 32)
    d, z = torch.from_numpy(weight.d).double(), torch.from_numpy(weight.z).double()  # type: ignore[arg-type]
    sums = torch.einsum("mbe,nbe->mnb", xq, q)
    return (sums * d[None] * dx[:, None]).sum(-1) + torch.einsum("mb,nb->mn", blocks.double().sum(-1), z)


@needs_native
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 40])  # the kernel takes rows 6 at a time: whole and partial tiles
def test_int8_gemm_rounds_only_the_activations(qtype: T, rows: int) -> None:
    """native_linear_q8 (VNNI, or its plain-C twin elsewhere) computes exactly the W4A8 sums: the file's 4-bit
    values, activations rounded per block of 32, integer products; its error against float32 arithmetic is then
    bounded by half a rounding step per activation."""
    n, k = 96, 224  # three pairs of 16-row panels, 7 blocks
    weight, w = _q4_layer(n, k, rows, qtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[:, 5] *= 40  # an outlier channel: its block gets a coarse scale, the others keep theirs
    x[0, 32:64] = 0  # an all-zero block
    got = native.linear_int8(native.library(), native.Int8Panels.pack(weight), x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    reference = _int8_reference(weight, x)
    float_bound = 8 * k * 2**-24 * (x.double().abs() @ w.double().abs().t()) + 1e-9
    assert ((got.double() - reference).abs() <= float_bound).all()
    # against the exact product: each activation moved by at most half its block's step (max|x| / 254), times
    # d * q (the offsets z multiply the exact block sums)
    step = (x.view(rows, -1, 32).abs().amax(-1) / 254).double().repeat_interleave(32, dim=1)
    dq = torch.from_numpy(weight.values() * weight.d.repeat(32, axis=1)).double()
    exact = x.double() @ w.double().t()
    assert ((got.double() - exact).abs() <= step @ dq.abs().t() + float_bound).all()
    assert (got.double() - exact).abs().max() > 0  # it does round (a float GEMM would pass the bound too)


@needs_native
def test_int8_panels_need_4bit_blocks_in_whole_panels() -> None:
    weight, _ = _q4_layer(48, 64, 0)  # 48 rows: three 16-row panels, not a whole number of pairs
    assert not native.int8_supported(weight)
    with pytest.raises(ValueError, match="multiple of 32 rows"):
        native.Int8Panels.pack(weight)
    q8, _ = _q4_layer(48, 64, 0, T.Q8_0)
    assert not native.int8_supported(q8)
    # a layer asked for int8 where it cannot have it keeps the exact float path
    layer = NativeLinear(weight, torch.nn.Linear(64, 48, bias=False), int8=True)
    assert layer.panels is None


@needs_native
def test_native_linear_rounds_to_int8_only_the_rows_it_is_told_where_the_cpu_has_vnni() -> None:
    """int8 activations only inside native.int8_rows (the engine's long-prompt chunks), only for those rows: the
    step's other rows (decodes, short prompts) keep the path they would take alone."""
    n, k, m = 64, 96, 40
    weight, w = _q4_layer(n, k, 3)
    fallback = torch.nn.Linear(k, n, bias=False)
    fallback.weight.data = -w  # a different answer, to tell which path ran
    layer = NativeLinear(weight, fallback, int8=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    assert torch.equal(layer(x), fallback(x))  # no int8 rows: as without int8
    if not native.library().native_vnni():
        assert layer.panels is None  # no VNNI: the exact paths only
        with native.int8_rows([(0, m)]):
            assert torch.equal(layer(x), fallback(x))
        return
    assert layer.panels is not None
    with native.int8_rows([(0, m)]):
        assert torch.equal(layer(x), native.linear_int8(native.library(), layer.panels, x))
    with native.int8_rows([(0, 30), (33, 36)]):
        mixed = layer(x)
    assert torch.equal(mixed[:30], native.linear_int8(native.library(), layer.panels, x[:30]))
    assert torch.equal(mixed[33:36], native.linear_int8(native.library(), layer.panels, x[33:36]))
    rest = torch.cat([x[30:33], x[36:]])
    assert torch.allclose(torch.cat([mixed[30:33], mixed[36:]]), fallback(rest), rtol=1e-5, atol=1e-5)
    with native.int8_rows([(m - 2, m)]):  # two rows of a long prompt beside 38 others: those go to the fallback
        assert torch.allclose(layer(x)[:-2], fallback(x[:-2]), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), fallback(x))  # the context is gone again


needs_vnni = pytest.mark.skipif(
    native.unavailable_reason() is not None or not native.library().native_vnni(), reason="no AVX-512 VNNI here"
)


def test_prefill_gemm_is_checked(tiny_gguf: Path) -> None:
    with pytest.raises(ConfigError, match="prefill_gemm must be auto, float or int8"):
        Engine(EngineConfig(model=tiny_gguf, device="cpu", kv_cache_tokens=256, prefill_gemm="int4"))
    # the tiny GGUF holds float tensors: no 4-bit blocks to multiply with int8 activations
    with pytest.raises(ConfigError, match="prefill_gemm=int8 needs int4 weights"):
        Engine(EngineConfig(model=tiny_gguf, device="cpu", kv_cache_tokens=256, prefill_gemm="int8"))


@needs_native
def test_int8_prefill_gemm_is_refused_without_vnni(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = native.library()
    monkeypatch.setattr(native, "library", lambda: _NoVnni(lib))
    with pytest.raises(ConfigError, match="needs a CPU with AVX-512 VNNI"):
        Engine(EngineConfig(model=model_path, device="cpu", kv_cache_tokens=256, prefill_gemm="int8"))


class _NoVnni:
    """The loaded kernels, reporting no VNNI (what an AVX2 machine's build reports)."""

    def __init__(self, lib: object) -> None:
        self._lib = lib

    def native_vnni(self) -> int:
        return 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)


@needs_vnni
@pytest.mark.slow
def test_int8_prefill_answers_like_the_exact_prefill(model_path: Path) -> None:
    """int8 activations in prefill chunks of WIDEN_ROWS rows and more: the passkey answer is the exact path's, and
    the next-token distribution after a long natural text stays close to it."""
    exact = Engine(EngineConfig(model=model_path, device="cpu", kv_cache_tokens=4096, prefill_gemm="float"))
    fast = Engine(EngineConfig(model=model_path, device="cpu", kv_cache_tokens=4096))  # auto: int8 with VNNI
    try:
        assert (fast.prefill_gemm, exact.prefill_gemm) == ("int8", "float")
        for b in fast.model.layers:
            assert all(m.panels is not None for m in (b.attn.wqkv, b.attn.wo, b.mlp.w_gate, b.mlp.w_up, b.mlp.w_down))
        assert all(m.panels is None for b in exact.model.layers for m in (b.attn.wqkv, b.mlp.w_down))
        ids = exact.tokenizer.encode(passkey_prompt(repeats_for(1500)))
        params = SamplingParams(temperature=0, max_tokens=8)
        answer = fast.generate(fast.new_request(ids, params))[0]
        assert answer == exact.generate(exact.new_request(ids, params))[0]
        assert "68193" in fast.tokenizer.decode(list(answer))
        source = default_text() if default_text().is_file() else Path(__file__).parents[2] / "README.md"
        text = fast.tokenizer.encode(source.read_text(errors="replace"))[:1200]
        # one prefill of a long prompt, logits at every position: int8 in every matmul against float32 (the exact
        # engine has no int8 panels). Measured on Python's license: top-1 agreement 0.935, mean KL 0.018
        a = prompt_logits(exact.model, text, int8=True, every_position=True).log_softmax(-1)
        b = prompt_logits(fast.model, text, int8=True, every_position=True).log_softmax(-1)
        kl = (a.exp() * (a - b)).sum(-1)
        agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        assert agreement > 0.85 and 0 < kl.mean().item() < 0.05, (agreement, kl.mean().item())
    finally:
        exact.shutdown()
        fast.shutdown()


def test_prefill_gemm_benchmark_times_both_paths_on_the_same_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`optimist bench prefill-gemm` at tiny shapes: a row per shape with both paths timed and the int8 path's error
    against the exact product, or (without VNNI) a clear refusal."""
    import json

    from optimist.engine.cli import build_parser

    parser = build_parser()
    out = tmp_path / "gemm.json"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    args = parser.parse_args(["bench", "prefill-gemm", "--shapes", "7:32:64,40:64:96", "--repeats", "1",
                              "--text", str(text), "--model-tokens", "48", "--out", str(out)])  # fmt: skip
    code = args.func(args)
    if native.unavailable_reason() is not None or not native.library().native_vnni():
        assert code == 2 and "AVX-512 VNNI" in capsys.readouterr().err
        return
    assert code == 0
    report = json.loads(out.read_text())
    assert [(r["m"], r["n"], r["k"]) for r in report["rows"]] == [(7, 32, 64), (40, 64, 96)]
    for r in report["rows"]:
        assert r["int8_ms"] > 0 and r["float_ms"] > 0 and 0 < r["relative_error"] < 0.02
    assert out.with_suffix(".md").read_text().startswith("| rows | outputs | inputs | int8 ms |")
    agreement = report["model_agreement"]  # 48 tokens: one prefill below WIDEN_ROWS rows, int8 all the same
    assert agreement["tokens"] == 48 and 0.5 < agreement["top1_agreement"] <= 1 and agreement["kl_mean"] > 0
    assert agreement["perplexity_float"] > 1 and agreement["perplexity_int8"] > 1
    for shape, named in (("8:48:64", "multiples of 32"), ("8:32", "m:n:k")):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "prefill-gemm", "--shapes", shape])
        assert named in capsys.readouterr().err
