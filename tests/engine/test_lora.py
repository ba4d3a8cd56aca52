"""LoRA adapters: PEFT's own files and forward pass are the reference (the adapters are written by `peft`'s
save_pretrained over transformers' model of the same GGUF file); one engine serves several adapters and the base
model in the same batches."""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from optimist.engine.api import engine_pb2 as pb
from optimist.engine.api import engine_pb2_grpc as pb_grpc
from optimist.engine.config import ConfigError, EngineConfig, ModelConfig
from optimist.engine.engine import Engine, UnknownAdapter
from optimist.engine.model.lora import AdapterError, load_adapter
from optimist.engine.outputs import Chunk, Finished
from optimist.engine.request import SamplingParams

from ..conftest import ServerThread, events_concurrently, events_of, serving

pytestmark = pytest.mark.slow

PROMPTS = [
    "<|im_start|>user\nName three rivers in Europe.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
    "def fibonacci(n):",
]
NEW_TOKENS = 16
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_model(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Path]]]:
    """transformers' model of the default GGUF with two PEFT adapters, saved by PEFT: "terse" (rank 8 on every
    projection, alpha 16) and "rs" (rank 4 on q, v and down_proj, rsLoRA, down_proj's alpha from alpha_pattern).
    PEFT starts B at zero (an adapter that changes nothing): B is drawn at random here so that each one changes the
    answers."""
    peft = pytest.importorskip("peft")  # a test extra (absent on a bare GPU machine)
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(hf_model),
        LoraConfig(r=8, lora_alpha=16, target_modules=ALL_MODULES, lora_dropout=0.0),
        adapter_name="terse",
    )
    model.add_adapter(
        "rs",
        LoraConfig(
            r=4,
            lora_alpha=12,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
            alpha_pattern={"down_proj": 6},
            lora_dropout=0.0,
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.06)
    model.eval()
    root = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(str(root), selected_adapters=["terse", "rs"])
    # PEFT writes the default-named first adapter under the root and the others in subfolders named after them
    dirs = {name: root / name if (root / name).is_dir() else root for name in ("terse", "rs")}
    assert all((d / "adapter_config.json").is_file() for d in dirs.values()), list(root.rglob("*"))
    yield model, dirs


def reference(peft_model: Any, adapter: str | None, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """PEFT's greedy continuation (the base model's with adapter None)."""
    model, _ = peft_model
    inputs = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)
        else:
            model.set_adapter(adapter)
            out = model.generate(inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def lora_engine(model_path: Path, peft_model: Any) -> Iterator[Engine]:
    _, dirs = peft_model
    eng = Engine(
        EngineConfig(
            model=model_path,
            weights="float",
            dtype="float32",
            kv_cache_tokens=4096,
            lora_modules=tuple(dirs.items()),
            runtime_lora_updating=True,
        )
    )
    yield eng
    eng.shutdown()


def make(engine: Engine, ids: list[int], adapter: str | None, n: int = NEW_TOKENS) -> Any:
    """A greedy request of `n` tokens under `adapter` (None: the base model)."""
    params = SamplingParams(max_tokens=n, temperature=0.0)
    return engine.new_request(ids, params, adapter=engine.adapter(adapter) if adapter else None)


def greedy(engine: Engine, ids: list[int], adapter: str | None, n: int = NEW_TOKENS) -> tuple[list[int], Finished]:
    events = events_of(engine, make(engine, ids, adapter, n))
    final = events[-1]
    assert isinstance(final, Finished) and final.error is None
    return [t for ev in events[:-1] if isinstance(ev, Chunk) for t in ev.token_ids], final


def test_answers_equal_peft_and_differ_from_the_base_model(lora_engine: Engine, peft_model: Any) -> None:
    for prompt in PROMPTS:
        ids = lora_engine.tokenizer.encode(prompt)
        base = reference(peft_model, None, ids)
        assert greedy(lora_engine, ids, None)[0] == base
        for adapter in ("terse", "rs"):
            want = reference(peft_model, adapter, ids)
            assert greedy(lora_engine, ids, adapter)[0] == want, (prompt, adapter)
            assert want != base, f"adapter {adapter} does not change the answer to {prompt!r}: a useless check"


def test_a_batch_mixing_adapters_equals_each_alone(lora_engine: Engine) -> None:
    """Base-model and adapter requests share steps (prefill chunks and decode rows of different adapters in one
    forward pass, drafts included): each answer is its solo answer."""
    plan = [(p, a) for p in PROMPTS for a in (None, "terse", "rs")] + [(PROMPTS[0], "terse")]
    solo = {(p, a): greedy(lora_engine, lora_engine.tokenizer.encode(p), a)[0] for p, a in set(plan)}
    requests = [make(lora_engine, lora_engine.tokenizer.encode(p), a) for p, a in plan]
    answers = events_concurrently(lora_engine, requests)
    for (p, a), events in zip(plan, answers, strict=True):
        assert [t for ev in events[:-1] for t in ev.token_ids] == solo[p, a], (p, a)


def test_the_prefix_cache_keeps_each_adapters_kv_apart(lora_engine: Engine, peft_model: Any) -> None:
    """K/V computed under one adapter are not another's (or the base model's): a prompt the base model just
    computed is recomputed under an adapter, then shared by that adapter's next request."""
    ids = lora_engine.tokenizer.encode(PROMPTS[0] * 5)  # several full blocks
    assert len(ids) > 3 * lora_engine.config.kv_block_size
    greedy(lora_engine, ids, None)
    tokens, first = greedy(lora_engine, ids, "terse")
    assert first.cached_tokens == 0
    assert tokens == reference(peft_model, "terse", ids)
    again, second = greedy(lora_engine, ids, "terse")
    assert second.cached_tokens >= 3 * lora_engine.config.kv_block_size
    assert again == tokens
    _, other = greedy(lora_engine, ids, "rs")
    assert other.cached_tokens == 0


def test_int4_weights_with_adapters(model_path: Path, lora_engine: Engine, peft_model: Any) -> None:
    """The CPU's default engine (the file's 4-bit blocks in C) takes adapters too, in its all-layers C decode
    step (each row's adapter update after each matmul) and in the torch layers of prefill steps: its answers
    are the float32 engine's, alone and in a batch mixing adapters."""
    _, dirs = peft_model
    eng = Engine(EngineConfig(model=model_path, kv_cache_tokens=2048, lora_modules=tuple(dirs.items())))
    try:
        if eng.model.native_decoder is None:
            pytest.skip("the native decoder does not run here (no C compiler)")
        decoder = eng.model.native_decoder
        calls: list[bool] = []
        run = decoder.run

        def counted(*args: Any) -> Any:
            out = run(*args)
            calls.append(args[-1] is not None and out is not None)  # a step with adapter rows, in C
            return out

        decoder.run = counted  # type: ignore[method-assign]
        plan = [(p, a) for p in PROMPTS[:2] for a in (None, "terse", "rs")]
        solo = {}
        for prompt, adapter in plan:
            ids = eng.tokenizer.encode(prompt)
            calls.clear()
            solo[prompt, adapter] = greedy(eng, ids, adapter)[0]
            assert solo[prompt, adapter] == greedy(lora_engine, ids, adapter)[0], (prompt, adapter)
            assert set(calls) == {adapter is not None}, "decode steps left the C decoder"
        requests = [make(eng, eng.tokenizer.encode(p), a) for p, a in plan]
        for (p, a), events in zip(plan, events_concurrently(eng, requests), strict=True):
            assert [t for ev in events[:-1] for t in ev.token_ids] == solo[p, a], (p, a)
    finally:
        eng.shutdown()


# ------------------------------------------------------------------------------------------- the APIs


@pytest.fixture(scope="module")
def lora_server(lora_engine: Engine) -> Iterator[ServerThread]:
    srv = serving(lora_engine, http=True)
    yield srv
    srv.stop()


def _post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_openai_api_serves_adapters_by_model_name(lora_server: ServerThread, lora_engine: Engine) -> None:
    url = lora_server.http_url
    base_name = lora_engine.model_name
    cards = {c["id"]: c for c in _get(f"{url}/v1/models")["data"]}
    assert set(cards) == {base_name, "terse", "rs"}
    assert cards["terse"]["parent"] == base_name and cards["terse"]["root"].endswith("terse")
    assert _get(f"{url}/v1/models/rs")["parent"] == base_name
    prompt = PROMPTS[1]
    ids = lora_engine.tokenizer.encode(prompt)
    for model in ("terse", base_name):
        status, text = _post(
            f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
        )
        assert status == 200, text
        body = json.loads(text)
        assert body["model"] == model
        want = greedy(lora_engine, ids, None if model == base_name else model)[0]
        assert body["choices"][0]["text"] == lora_engine.tokenizer.decode(want)
    status, text = _post(f"{url}/v1/completions", {"model": "nope", "prompt": prompt, "max_tokens": 2})
    assert status == 404 and "'terse'" in text and "'nope'" in text


def test_adapters_load_and_unload_while_serving(
    lora_server: ServerThread, lora_engine: Engine, peft_model: Any
) -> None:
    _, dirs = peft_model
    url = lora_server.http_url
    prompt = PROMPTS[1]
    ids = lora_engine.tokenizer.encode(prompt)
    status, text = _post(f"{url}/v1/load_lora_adapter", {"lora_name": "rs2", "lora_path": str(dirs["rs"])})
    assert status == 200, text
    status, text = _post(f"{url}/v1/completions", {"model": "rs2", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 200, text
    assert json.loads(text)["choices"][0]["text"] == lora_engine.tokenizer.decode(greedy(lora_engine, ids, "rs", 8)[0])
    status, text = _post(f"{url}/v1/load_lora_adapter", {"lora_name": "rs2", "lora_path": str(dirs["rs"])})
    assert status == 400 and "already loaded" in text and '"param": "lora_name"' in text
    # load_inplace: new files under the name (a failed load keeps the old ones)
    status, text = _post(
        f"{url}/v1/load_lora_adapter", {"lora_name": "rs2", "lora_path": "/nope", "load_inplace": True}
    )
    assert status == 400 and "rs2" in {c["id"] for c in _get(f"{url}/v1/models")["data"]}
    body = {"lora_name": "rs2", "lora_path": str(dirs["terse"]), "load_inplace": True}
    assert _post(f"{url}/v1/load_lora_adapter", body)[0] == 200
    status, text = _post(f"{url}/v1/completions", {"model": "rs2", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert json.loads(text)["choices"][0]["text"] == lora_engine.tokenizer.decode(
        greedy(lora_engine, ids, "terse", 8)[0]
    )
    status, text = _post(f"{url}/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/nonexistent/adapter"})
    assert status == 400 and "adapter_config.json" in text
    assert "bad" not in {c["id"] for c in _get(f"{url}/v1/models")["data"]}
    # a request running with an adapter finishes with it when the adapter is unloaded meanwhile
    running = lora_engine.new_request(
        lora_engine.tokenizer.encode(PROMPTS[0]),
        SamplingParams(max_tokens=40, temperature=0.0),
        adapter=lora_engine.adapter("rs2"),
    )
    want = greedy(lora_engine, running.prompt_ids, "terse", 40)[0]  # (rs2 holds terse's files now)
    done: list[Any] = []
    lora_engine.submit(running, done.append)
    assert _post(f"{url}/v1/unload_lora_adapter", {"lora_name": "rs2"})[0] == 200
    deadline = time.monotonic() + 120
    while not (done and isinstance(done[-1], Finished)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [t for ev in done[:-1] for t in ev.token_ids] == want
    status, text = _post(f"{url}/v1/completions", {"model": "rs2", "prompt": prompt, "max_tokens": 2})
    assert status == 404
    status, text = _post(f"{url}/v1/unload_lora_adapter", {"lora_name": "rs2"})
    assert status == 404 and "rs2" in text


def test_runtime_loading_is_off_unless_allowed(engine: Engine) -> None:
    """A server without LoRA refuses to load adapters, naming the flags."""
    srv = serving(engine, http=True)
    try:
        status, text = _post(f"{srv.http_url}/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})
        assert status == 403 and "--enable-lora" in text
    finally:
        srv.stop()


def test_grpc_generate_with_an_adapter(lora_server: ServerThread, lora_engine: Engine) -> None:
    prompt = PROMPTS[2]
    with grpc.insecure_channel(lora_server.address) as channel:
        stub = pb_grpc.EngineStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert {a.name: a.rank for a in info.adapters} == {"terse": 8, "rs": 4}
        assert info.max_loras == lora_engine.config.max_loras
        request = pb.GenerateRequest(text=prompt, adapter="terse")
        request.sampling.max_tokens = NEW_TOKENS
        request.sampling.temperature = 0
        tokens = [t for m in stub.Generate(request) if m.HasField("chunk") for t in m.chunk.token_ids]
        assert tokens == greedy(lora_engine, lora_engine.tokenizer.encode(prompt), "terse")[0]
        request.adapter = "nope"
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()


def test_load_and_metrics_name_the_running_adapters(lora_server: ServerThread, lora_engine: Engine) -> None:
    """What the Gateway API Inference Extension's endpoint picker reads for LoRA affinity."""
    req = lora_engine.new_request(
        lora_engine.tokenizer.encode(PROMPTS[0]),
        SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
        adapter=lora_engine.adapter("terse"),
    )
    done: list[Any] = []
    lora_engine.submit(req, done.append)
    try:
        deadline = time.monotonic() + 60
        while not any(isinstance(e, Chunk) for e in done) and time.monotonic() < deadline:
            time.sleep(0.02)
        load = lora_engine.load()
        assert load.running_adapters == ("terse",) and load.max_loras == lora_engine.config.max_loras
        with urllib.request.urlopen(f"{lora_server.http_url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        line = next(x for x in text.splitlines() if x.startswith("vllm:lora_requests_info{"))
        assert 'running_lora_adapters="terse"' in line and f'max_lora="{lora_engine.config.max_loras}"' in line
        assert "optimist_lora_adapters_running{" in text
    finally:
        lora_engine.abort([req.id])


# ------------------------------------------------------------------------------------ refused adapters


TINY = ModelConfig("tiny", 300, 64, 128, 2, 4, 2, 16, 10000.0, 1e-5, 256, True)


def _write(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _pair(module: str, r: int, fan_in: int, fan_out: int, layer: int = 0) -> dict[str, torch.Tensor]:
    kind = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    key = f"base_model.model.model.layers.{layer}.{kind}.{module}"
    return {f"{key}.lora_A.weight": torch.randn(r, fan_in), f"{key}.lora_B.weight": torch.randn(fan_out, r)}


def test_an_adapter_folded_as_peft_scales_it(tmp_path: Path) -> None:
    """q and v parts of the fused QKV projection land in their own rows, scaled alpha / r (rsLoRA: / sqrt(r))."""
    tensors = {**_pair("q_proj", 4, 64, 64), **_pair("v_proj", 4, 64, 32), **_pair("down_proj", 2, 128, 64, layer=1)}
    folder = _write(tmp_path / "a", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, tensors)
    adapter = load_adapter("a", folder, TINY, max_rank=8)
    a, b = adapter.weights[0]["wqkv"]
    x = torch.randn(3, 64)
    delta = x @ a.t() @ b.t()
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    v = "base_model.model.model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(
        delta[:, :64], 2.0 * x @ tensors[f"{q}.lora_A.weight"].t() @ tensors[f"{q}.lora_B.weight"].t()
    )
    assert delta[:, 64:96].abs().max() == 0  # k untouched
    torch.testing.assert_close(
        delta[:, 96:], 2.0 * x @ tensors[f"{v}.lora_A.weight"].t() @ tensors[f"{v}.lora_B.weight"].t()
    )
    assert set(adapter.weights[1]) == {"w_down"} and not adapter.weights[0].keys() - {"wqkv"}
    rs = load_adapter("rs", _write(tmp_path / "rs", {"r": 4, "lora_alpha": 8, "use_rslora": True}, tensors), TINY, 8)
    torch.testing.assert_close(rs.weights[0]["wqkv"][1], b * (8 / 2) / 2.0)  # 8 / sqrt(4) against 8 / 4


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"r": 4, "use_dora": True}, _pair("q_proj", 4, 64, 64), "DoRA"),
        ({"r": 4, "modules_to_save": ["lm_head"]}, _pair("q_proj", 4, 64, 64), "modules_to_save"),
        ({"r": 4, "bias": "all"}, _pair("q_proj", 4, 64, 64), "bias"),
        ({"r": 4, "peft_type": "IA3"}, _pair("q_proj", 4, 64, 64), "IA3"),
        ({"r": 4}, _pair("embed_tokens", 4, 300, 64), "embed_tokens"),
        ({"r": 4}, _pair("q_proj", 4, 576, 576), "another base model"),
        ({"r": 4}, _pair("q_proj", 4, 64, 64, layer=5), "layer 5"),
        ({"r": 16}, _pair("q_proj", 16, 64, 64), "max_lora_rank"),
        ({"r": 4}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64)}, "pair"),
        ({"r": 4}, {k: v * float("nan") for k, v in _pair("q_proj", 4, 64, 64).items()}, "non-finite"),
        ({"r": 0}, _pair("q_proj", 0, 64, 64), "lora_A"),  # rank 0: nothing to scale by
        ({"r": 4}, {k: v[0] for k, v in _pair("q_proj", 4, 64, 64).items()}, "lora_A"),  # 1-D tensors
        ({"r": 4, "alpha_pattern": {"q_proj(": 8}}, _pair("q_proj", 4, 64, 64), "not a regular expression"),
        ({"r": 4, "alpha_pattern": {"q_proj": "8"}}, _pair("q_proj", 4, 64, 64), "must be a number"),
    ],
)
def test_adapters_the_engine_cannot_apply_are_refused_by_name(
    tmp_path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(AdapterError, match=message):
        load_adapter("x", _write(tmp_path / "x", config, tensors), TINY, max_rank=8)


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"adapter_config\.json does not exist"):
        load_adapter("x", tmp_path, TINY, 8)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not readable JSON"):
        load_adapter("x", tmp_path, TINY, 8)
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(AdapterError, match="safe_serialization"):
        load_adapter("x", tmp_path, TINY, 8)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter("x", tmp_path, TINY, 8)


def test_engine_config_errors_name_the_adapter(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="given twice"):
        EngineConfig(lora_modules=(("a", tmp_path), ("a", tmp_path))).validate()
    with pytest.raises(ConfigError, match="commas"):
        EngineConfig(lora_modules=(("a,b", tmp_path),)).validate()
    with pytest.raises(ConfigError, match="max_loras"):
        EngineConfig(max_loras=0).validate()
    with pytest.raises(ConfigError, match=r"adapter 'gone'.*does not exist"):
        Engine(EngineConfig(model=model_path, kv_cache_tokens=256, lora_modules=(("gone", tmp_path / "gone"),)))


def test_requests_name_only_loaded_adapters(lora_engine: Engine) -> None:
    with pytest.raises(UnknownAdapter, match="nope"):
        lora_engine.adapter("nope")


def test_the_cli_takes_lora_modules_in_both_forms(capsys: pytest.CaptureFixture[str]) -> None:
    from optimist.engine.cli import build_parser, engine_config

    parser = build_parser()
    as_json = json.dumps({"name": "b", "path": "/y", "base_model_name": "m"})
    args = parser.parse_args(["serve", "--lora-modules", "a=/x", as_json, "--max-loras", "2"])
    config = engine_config(args)
    assert config.lora_modules == (("a", Path("/x")), ("b", Path("/y")))
    assert config.lora_enabled and config.max_loras == 2 and not config.runtime_lora_updating
    args = parser.parse_args(["serve", "--enable-lora", "--allow-runtime-lora-updating"])
    assert engine_config(args).runtime_lora_updating and engine_config(args).lora_enabled
    assert not engine_config(parser.parse_args(["serve"])).lora_enabled
    for bad, words in (
        ("noequals", "is not NAME=PATH"),
        ('{"name": "a"}', '{"name": NAME, "path": PATH}'),
        ('{"name": "a", "path": "/x", "rank": 4}', "unknown key 'rank'"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--lora-modules", bad])
        assert words in capsys.readouterr().err


def test_kserve_serves_adapters_as_models(lora_server: ServerThread, lora_engine: Engine) -> None:
    from optimist.engine.api import grpc_service_pb2 as kpb
    from optimist.engine.api import grpc_service_pb2_grpc as kpb_grpc

    from .test_kserve import infer_request, outputs

    prompt = PROMPTS[1]
    params = {"max_tokens": NEW_TOKENS, "temperature": 0}
    with grpc.insecure_channel(lora_server.address) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(kpb.ModelReadyRequest(name="rs")).ready
        assert stub.ModelMetadata(kpb.ModelMetadataRequest(name="rs")).name == "rs"
        request = infer_request(lora_engine, prompt, sampling_parameters=params, exclude_input_in_output=True)
        request.model_name = "rs"
        text = outputs(stub.ModelInfer(request))["text_output"][0]
        assert text == lora_engine.tokenizer.decode(greedy(lora_engine, lora_engine.tokenizer.encode(prompt), "rs")[0])
        request.model_name = "nope"
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.value.details()


def test_under_memory_pressure_adapters_keep_their_answers(tiny_gguf: Path, tmp_path: Path) -> None:
    """The tiny model with a cache too small for the batch: requests of the same prompt under the base model and two
    adapters (one twice), after each ran once (its blocks left in the prefix cache), are preempted and re-prefilled,
    and each answer is the one an engine without prefix caching gives (a block computed under one adapter never
    serves another); every block is freed after."""
    from optimist.engine.bench.lora import write_random_adapter

    def engine(**config: Any) -> Engine:
        eng = Engine(EngineConfig(model=tiny_gguf, max_num_batched_tokens=32, enable_lora=True, **config))
        for i, name in enumerate(("a", "b")):
            folder = tmp_path / name
            if not folder.exists():
                write_random_adapter(folder, eng.model_config, rank=4, seed=i, std=0.5)
            eng.load_adapter(name, folder)
        return eng

    plan = [None, "a", "b", "a"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = engine(kv_cache_tokens=1024, prefix_caching=False)
    try:
        prompt = reference.tokenizer.encode("the cat sat on the mat " * 8)[:60]
        alone = {}
        for a in plan:
            request = reference.new_request(prompt, params, adapter=reference.adapter(a) if a else None)
            alone[a] = reference.generate(request)[0]
    finally:
        reference.shutdown()
    assert len({tuple(v) for v in alone.values()}) == 3, "the adapters do not change the tiny model's answer"
    eng = engine(kv_cache_tokens=192, max_num_seqs=4)
    try:
        for a in plan[:3]:  # each one's prompt blocks into the prefix cache
            assert eng.generate(eng.new_request(prompt, params, adapter=eng.adapter(a) if a else None))[0] == alone[a]
        requests = [eng.new_request(prompt, params, adapter=eng.adapter(a) if a else None) for a in plan]
        events = events_concurrently(eng, requests, timeout_s=120)
        assert sum(evs[-1].evictions for evs in events) > 0, "no preemption: the test needs a smaller cache"
        assert sum(evs[-1].cached_tokens for evs in events) > 0, "no prefix-cache hit: the test checks nothing"
        for a, evs in zip(plan, events, strict=True):
            assert [t for ev in evs[:-1] for t in ev.token_ids] == alone[a], a
        assert eng.allocator.num_used == 0
    finally:
        eng.shutdown()


def test_optimist_generate_takes_an_adapter(
    lora_server: ServerThread, lora_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from optimist.engine.cli import build_parser

    prompt = PROMPTS[1]
    want = lora_engine.tokenizer.decode(greedy(lora_engine, lora_engine.tokenizer.encode(prompt), "rs", 8)[0])
    argv = ["generate", prompt, "--server", lora_server.address, "--adapter", "rs", "--max-tokens", "8",
            "--temperature", "0"]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    assert capsys.readouterr().out == want + "\n"
    args = build_parser().parse_args([*argv[:5], "nope", *argv[6:]])
    assert args.func(args) != 0
    assert "nope" in capsys.readouterr().err


def test_a_qwen2_adapter_equals_its_merged_weights(tmp_path: Path) -> None:
    """Merging W += s B A into a copy of the weights is what an adapter means: a Qwen2 model (Q/K/V biases beside
    the fused projection's update) with an adapter gives the logits of its merged copy, in a batch with base rows."""
    from safetensors.torch import load_file, save_file

    from optimist.engine.bench.lora import write_random_adapter

    from .. import tiny_llama

    base_dir = tiny_llama.write_hf_dir(tmp_path / "base", arch="qwen2")
    eng = Engine(EngineConfig(model=base_dir, weights="float", dtype="float32", kv_cache_tokens=1024, enable_lora=True))
    merged_dir = tmp_path / "merged"
    try:
        adapter_dir = write_random_adapter(tmp_path / "ad", eng.model_config, rank=4, seed=3, std=0.3)
        eng.load_adapter("ad", adapter_dir)
        weights = load_file(str(base_dir / "model.safetensors"))
        lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
        scale = json.loads((adapter_dir / "adapter_config.json").read_text())["lora_alpha"] / 4
        for key in [k for k in lora if k.endswith("lora_A.weight")]:
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            weights[target] = weights[target] + scale * lora[key.replace("lora_A", "lora_B")] @ lora[key]
        merged_dir.mkdir()
        for item in base_dir.iterdir():
            if item.name != "model.safetensors":
                (merged_dir / item.name).write_bytes(item.read_bytes())
        save_file(weights, str(merged_dir / "model.safetensors"))
        prompt = eng.tokenizer.encode("the cat sat on the mat")
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
        both = events_concurrently(eng, [eng.new_request(prompt, params, adapter=eng.adapter("ad")),
                                         eng.new_request(prompt, params)])  # fmt: skip
    finally:
        eng.shutdown()
    merged = Engine(EngineConfig(model=merged_dir, weights="float", dtype="float32", kv_cache_tokens=1024))
    try:
        want = events_of(merged, merged.new_request(prompt, params))
    finally:
        merged.shutdown()

    def tokens_and_logprobs(events: list[Any]) -> tuple[list[int], list[float]]:
        chunks = [ev for ev in events if isinstance(ev, Chunk)]
        return [t for c in chunks for t in c.token_ids], [lp[1] for c in chunks for lp in c.logprobs]

    got, got_lp = tokens_and_logprobs(both[0])
    ref, ref_lp = tokens_and_logprobs(want)
    assert got == ref and tokens_and_logprobs(both[1])[0] != ref
    assert got_lp == pytest.approx(ref_lp, abs=1e-4)
