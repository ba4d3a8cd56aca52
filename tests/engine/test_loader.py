"""A missing or malformed model fails at start-up with a one-line reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from optimist.engine.model.loader import ModelLoadError, load_model


def assert_one_line_error(path: Path, fragment: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and fragment in message, message


def test_missing_path(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path / "nope.gguf", "does not exist")


def test_garbage_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    assert_one_line_error(bad, "bad.gguf")


def test_truncated_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert_one_line_error(cut, "cut.gguf")


def test_wrong_extension(tmp_path: Path) -> None:
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 64)
    assert_one_line_error(other, "expected a .gguf file")


def test_hf_folder_without_config(tmp_path: Path, tiny_dir: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(tiny_dir, folder)
    (folder / "config.json").unlink()
    assert_one_line_error(folder, "no config.json")


def test_hf_folder_without_weights(tmp_path: Path, tiny_dir: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    assert_one_line_error(folder, "no *.safetensors")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_type": "gemma"}, "model_type 'gemma' is not supported (llama, mistral or qwen2)"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window is not supported"),
        ({"attention_bias": True}, "biases in the output projection are not supported"),
        ({"mlp_bias": True}, "biases in the MLP are not supported"),
    ],
)
def test_hf_configs_it_cannot_run_are_named(
    tmp_path: Path, tiny_dir: Path, change: dict[str, object], named: str
) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    assert_one_line_error(folder, named)


def test_loads_both_formats_with_tokenizer_and_template(tiny_gguf: Path, tiny_dir: Path) -> None:
    for path, tied in ((tiny_gguf, True), (tiny_dir, False)):
        model = load_model(path)
        assert model.config.num_layers == 2 and model.config.num_kv_heads == 2 and model.config.tie_embeddings == tied
        assert model.tokenizer.eos_ids == (2,)
        assert model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("assistant\n")
        assert model.tokenizer.decode(model.tokenizer.encode("the cat")) == "the cat"


def test_a_model_built_for_weights_equals_one_built_and_initialized(tiny_gguf: Path, tiny_dir: Path) -> None:
    import torch

    from optimist.engine.model.llama import Llama, prompt_logits

    for path in (tiny_gguf, tiny_dir):  # tied and separate output weights
        loaded = load_model(path)
        plain, empty = Llama(loaded.config), Llama.for_weights(loaded.config)
        plain.load_weights(loaded.weights)
        empty.load_weights(loaded.weights)  # skipped the random init: every parameter must come from the load
        a, b = plain.state_dict(), empty.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert b[key].device.type == "cpu" and torch.equal(a[key], b[key]), key
        plain.init_rope()
        empty.init_rope()
        ids = [3, 5, 7, 11]
        assert torch.equal(
            prompt_logits(plain, ids, every_position=True), prompt_logits(empty, ids, every_position=True)
        )
