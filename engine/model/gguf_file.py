"""A GGUF file's metadata and tensors, read in one pass.

The `gguf` package's reader builds a numpy view for every part of every metadata value, so a file with a 49K-token
vocabulary and 48K merges (SmolLM2's) takes ~2.5 s to open here, a quarter of an engine's start. This reader parses
the same format (little-endian GGUF v2/v3: header, key/value metadata, tensor infos, aligned data) with `struct` and
one `bytes.decode` per string (~0.1 s), and maps the tensor data read-only, as that reader does. Quantization tables
and dequantization still come from `gguf`. The metadata values are plain Python values: what `ReaderField.contents()`
returns (a test compares both readers on the default model).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML's
# value types: (struct code, size) for scalars; 8 string, 9 array
_SCALARS = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
    10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}  # fmt: skip
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9
# unquantized tensor types and their element types (the rest are blocks of bytes)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFError(ValueError):
    """The file is not GGUF, or not one this reader can take (big-endian, truncated, unknown value type)."""


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as stored: fastest-varying dimension first (GGML order)
    data: np.ndarray  # read-only view: elements for plain types, [..., bytes per row] for block types


class GGUFFile:
    """`fields`: metadata key -> value (int, float, bool, str or list); `tensors`: in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, mode="r")
        self._buf = memoryview(self._map)  # type: ignore[arg-type]  # a memmap exports the buffer protocol
        self._pos = 0
        if bytes(self._buf[:4]) != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {bytes(self._buf[:4])!r})")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            swapped = int.from_bytes(int(version).to_bytes(4, "little"), "big")
            if swapped in (2, 3):
                raise GGUFError(f"{self.path}: big-endian GGUF files are not supported")
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_fields = self._scalar(10), self._scalar(10)
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if n_dims > MAX_DIMS or self._pos + 8 * n_dims > len(self._buf):
                raise GGUFError(f"{self.path}: tensor {name} has {n_dims} dimensions or is truncated")
            dims = struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos)
            self._pos += 8 * n_dims
            infos.append((name, tuple(int(d) for d in dims), self._scalar(4), self._scalar(10)))
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = self._pos + (-self._pos) % align
        self.tensors = [self._tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise GGUFError(f"{self.path}: a tensor name appears twice")

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def _scalar(self, kind: int) -> Any:
        code, size = _SCALARS[kind]
        if self._pos + size > len(self._buf):
            raise GGUFError(f"{self.path}: truncated at byte {self._pos}")
        (value,) = struct.unpack_from("<" + code, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        end = self._pos + n
        if end > len(self._buf):
            raise GGUFError(f"{self.path}: truncated at byte {self._pos}")
        text = bytes(self._buf[self._pos : end]).decode("utf-8")
        self._pos = end
        return text

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._scalar(kind)
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise GGUFError(f"{self.path}: unknown metadata value type {kind} at byte {self._pos}")
        item, count = self._scalar(4), self._scalar(10)
        if item in _NUMPY:  # numbers: one read
            dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
            end = self._pos + count * dtype.itemsize
            if end > len(self._buf):
                raise GGUFError(f"{self.path}: truncated at byte {self._pos}")
            values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).tolist()
            self._pos = end
            return values
        return [self._value(item) for _ in range(count)]

    def _tensor(self, name: str, dims: tuple[int, ...], kind: int, offset: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFError(f"{self.path}: tensor {name} has unknown type {kind}") from None
        n = int(np.prod(dims)) if dims else 1
        shape = tuple(reversed(dims))
        if kind in _PLAIN:
            dtype, count = np.dtype(_PLAIN[kind]), n
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            dtype, count = np.dtype(np.uint8), n * size // block
            shape = quant_shape_to_byte_shape(shape, qtype)
        if offset + count * dtype.itemsize > len(self._buf):
            raise GGUFError(f"{self.path}: tensor {name} runs past the end of the file")
        data = np.ndarray(shape, dtype=dtype, buffer=self._map, offset=offset)
        return GGUFTensor(name, qtype, dims, data)
