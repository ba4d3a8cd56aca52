"""Our GGUF reader returns what the `gguf` package's reader does (metadata values and tensor data) on the default
model and on a file holding every metadata value type, and refuses malformed files with the reason."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from optimist.engine.model.gguf_file import GGUFError, GGUFFile


def same_as_reference(path: Path) -> GGUFFile:
    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's own header entries
    assert sorted(ours.fields) == sorted(keys)
    for key in keys:
        want = ref.fields[key].contents()
        assert ours.fields[key] == want and type(ours.fields[key]) is type(want), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name
    return ours


def test_the_default_model_reads_as_the_gguf_package_reads_it(model_path: Path) -> None:
    ours = same_as_reference(model_path)
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152 and ours.get("llama.block_count") == 30
    assert ours.get("no.such.key", 7) == 7


def test_every_value_type_and_plain_and_block_tensors(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**40 + 3)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ü b"])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("plain", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("half", rng.standard_normal((2, 32)).astype(np.float16))
    q4 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blocks", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = same_as_reference(path)
    assert ours.get("t.u64") == 2**40 + 3 and ours.get("t.str") == "héllo ✓" and ours.get("t.strs") == ["a", "", "ü b"]
    blocks = ours.tensors[2]
    assert blocks.shape == (64, 4) and blocks.data.shape == (4, 40)  # 2 blocks of 20 bytes a row
    assert np.array_equal(gguf.quants.dequantize(blocks.data, blocks.tensor_type).shape, (4, 64))


def test_malformed_files_are_refused_with_the_reason(tmp_path: Path, tiny_gguf: Path) -> None:
    def refused(data: bytes, fragment: str) -> None:
        path = tmp_path / "bad.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFError, match=fragment):
            GGUFFile(path)

    good = tiny_gguf.read_bytes()
    refused(b"GGML" + good[4:], "not a GGUF file")
    refused(good[:4] + struct.pack("<I", 7) + good[8:], "version 7")
    refused(good[:4] + struct.pack(">I", 3) + good[8:], "big-endian")
    refused(good[:200], "truncated")
    refused(good[: len(good) - 64], "past the end")
    refused(good.replace(b"token_embd.weight\x02\x00\x00\x00", b"token_embd.weight\xff\x00\x00\x00"), "255 dimensions")


def test_blocks_widened_by_the_native_kernels_equal_the_gguf_dequantization(model_path: Path) -> None:
    import torch

    from optimist.engine.model import native
    from optimist.engine.model.loader import load_model

    if native.unavailable_reason() is not None:
        pytest.skip(native.unavailable_reason())
    kept = load_model(model_path, keep_blocks=True)  # block tensors' floats from native_widen
    plain = load_model(model_path)  # every tensor through gguf.quants.dequantize
    assert len(kept.blocks) == 211 and kept.weights.keys() == plain.weights.keys()
    for key, value in plain.weights.items():
        assert torch.equal(kept.weights[key], value), key  # bit for bit: d * q is exact in float32
