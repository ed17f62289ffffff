"""A GGUF file's metadata and tensor index, read in one pass over its header.

`gguf.GGUFReader` builds a numpy view for every part of every metadata value: on the default
model (a 49k-token vocabulary and 48k merges in the metadata) that takes ~10 s per open, and a
worker opened the file twice (weights, then tokenizer). This reader decodes the header with
`struct` from one memory map (~0.1 s) and hands out tensors as views of the same map.

Every length and count is checked against the file's size, so a truncated or hostile file is a
ValueError, never a huge allocation. Little-endian GGUF v2 and v3 only (what llama.cpp writes).
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of one scalar (8 string, 9 array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
            10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True, slots=True, eq=False)
class GGUFTensor:
    """One tensor of the file. `shape` is GGUF's (reversed from HF's: innermost first);
    `data` is a read-only view of the mapped file: elements for plain types, bytes per row
    (`quant_shape_to_byte_shape`) for quantized ones, as `gguf.quants.dequantize` expects."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray = field(repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class GGUFFile:
    path: Path
    fields: dict[str, Any]  # metadata key -> int / float / bool / str / list
    tensors: list[GGUFTensor] = field(repr=False)
    metadata_digest: str  # sha256 of the header (metadata + tensor index): keys derived caches


def read_gguf(path: Path) -> GGUFFile:
    """Parse `path`'s header; tensors stay in the memory map until someone reads them."""
    with open(path, "rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ValueError(f"{path} is empty") from None
    cursor = _Cursor(memoryview(mapped))
    if cursor.take(4) != _MAGIC:
        raise ValueError(f"{path} does not start with the GGUF magic")
    version = cursor.scalar("I")
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported (only {_VERSIONS})")
    tensor_count, field_count = cursor.scalar("Q"), cursor.scalar("Q")
    fields = {}
    for _ in range(cursor.bounded(field_count, 9)):
        key = cursor.string()
        fields[key] = cursor.value(cursor.scalar("I"))
    infos = [_tensor_info(cursor) for _ in range(cursor.bounded(tensor_count, 24))]
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"GGUF general.alignment {alignment!r} is not a power of two")
    start = -(-cursor.offset // alignment) * alignment
    raw = np.frombuffer(mapped, dtype=np.uint8)
    digest = hashlib.sha256(cursor.buffer[:cursor.offset]).hexdigest()
    return GGUFFile(path=path, fields=fields, metadata_digest=digest,
                    tensors=[_tensor(raw, start, *info) for info in _unique(infos)])


class _Cursor:
    """Reads little-endian values from a buffer, each bounded by what is left of it."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.offset = buffer, 0

    def take(self, size: int) -> memoryview:
        end = self.offset + size
        if size < 0 or end > len(self.buffer):
            raise ValueError(f"GGUF header truncated: {size} bytes wanted at offset "
                             f"{self.offset} of {len(self.buffer)}")
        view, self.offset = self.buffer[self.offset:end], end
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def bounded(self, count: int, min_bytes_each: int) -> int:
        """`count` items of at least `min_bytes_each` bytes must fit in what is left."""
        if count * min_bytes_each > len(self.buffer) - self.offset:
            raise ValueError(f"GGUF header claims {count} items: more than the file holds")
        return count

    def string(self) -> str:
        raw = self.take(self.scalar("Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"GGUF string at offset {self.offset} is not UTF-8") from None

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        if value_type not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.scalar(_SCALARS[value_type])

    def array(self) -> list:
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALARS:  # numbers in one read
            fmt = _SCALARS[item_type]
            raw = self.take(self.bounded(count, struct.calcsize(fmt)) * struct.calcsize(fmt))
            return list(struct.unpack(f"<{count}{fmt}", raw))
        return [self.value(item_type) for _ in range(self.bounded(count, 8))]


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string()
    dims = cursor.bounded(cursor.scalar("I"), 8)
    shape = tuple(cursor.scalar("Q") for _ in range(dims))
    return name, shape, cursor.scalar("I"), cursor.scalar("Q")


def _unique(infos: list[tuple]) -> list[tuple]:
    names = [info[0] for info in infos]
    if len(set(names)) != len(names):
        raise ValueError("GGUF file lists a tensor name twice")
    return infos


def _tensor(raw: np.ndarray, start: int, name: str, shape: tuple[int, ...], type_id: int,
            offset: int) -> GGUFTensor:
    try:
        tensor_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"GGUF tensor {name!r} has unknown type {type_id}") from None
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
    size = elements * type_size // block_size
    begin = start + offset
    if begin + size > raw.size:
        raise ValueError(f"GGUF tensor {name!r} runs past the end of the file")
    hf_shape = tuple(reversed(shape))
    data = raw[begin:begin + size]
    if tensor_type in _PLAIN_DTYPES:
        data = data.view(_PLAIN_DTYPES[tensor_type]).reshape(hf_shape)
    else:
        data = data.reshape(quant_shape_to_byte_shape(hf_shape, tensor_type))
    return GGUFTensor(name=name, tensor_type=tensor_type, shape=shape, data=data)
