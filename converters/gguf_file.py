"""A GGUF file's metadata and tensor index, read with ``struct`` and one memory map.

gguf-py's ``GGUFReader`` builds a numpy view for every part of every metadata value: the
embedded model's 49k-token vocabulary and 49k merges alone take it ~3 s on a 2-core host, more
than the rest of the load. This reader decodes the metadata straight into Python values (the
string arrays in one pass over the bytes) and maps the tensor data once, as read-only numpy
views in gguf-py's shapes, so ``gguf.quants.dequantize`` takes them as they are.

Layout (GGUF v2 and v3): the magic ``GGUF``, a uint32 version, uint64 tensor and key-value
counts; the key-values (a string key, a uint32 value type, the value); one info per tensor (name,
uint32 rank, uint64 dims with the fastest first, uint32 ggml type, uint64 offset); then the data,
aligned to ``general.alignment`` (32 by default).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
# GGUF value type -> struct format of one scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numbers (everything else is quantised blocks, read as uint8 rows).
_PLAIN = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    data: np.ndarray  # numpy order (reversed); quantised types as rows of bytes, as gguf-py gives them


class GGUFFile:
    """``fields``: metadata key -> Python value (str, int, float, bool or a list); ``tensors``:
    the tensor index, in file order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._mv = memoryview(self._buf)
        if bytes(self._mv[:4]) != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (magic {bytes(self._mv[:4])!r})")
        # The version's byte order tells the file's: a big-endian file's version reads as huge.
        self._endian = "<" if struct.unpack_from("<I", self._mv, 4)[0] < 0x10000 else ">"
        version, num_tensors, num_fields = self._unpack("IQQ", 4)
        if version < 2:
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(num_fields):
            key, pos = self._string(pos)
            (kind,) = self._unpack("I", pos)
            self.fields[key], pos = self._value(kind, pos + 4)
        infos = []
        for _ in range(num_tensors):
            name, pos = self._string(pos)
            (rank,) = self._unpack("I", pos)
            dims = self._unpack("Q" * rank, pos + 4)
            kind, offset = self._unpack("IQ", pos + 4 + 8 * rank)
            pos += 4 + 8 * rank + 12
            infos.append((name, dims, GGMLQuantizationType(kind), offset))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-pos // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError(f"{self.path}: duplicated tensor names")

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    # -- decoding --------------------------------------------------------------------------------
    def _unpack(self, fmt: str, pos: int) -> tuple:
        return struct.unpack_from(self._endian + fmt, self._mv, pos)

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = self._unpack("Q", pos)
        return str(self._mv[pos + 8 : pos + 8 + n], "utf-8"), pos + 8 + n

    def _value(self, kind: int, pos: int) -> tuple[Any, int]:
        if kind == _STRING:
            return self._string(pos)
        if kind == _ARRAY:
            item, count = self._unpack("IQ", pos)
            return self._array(item, count, pos + 12)
        if kind not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind} at byte {pos}")
        fmt = _SCALARS[kind]
        return self._unpack(fmt, pos)[0], pos + struct.calcsize(fmt)

    def _array(self, item: int, count: int, pos: int) -> tuple[list, int]:
        if item in _SCALARS:  # numbers: one numpy view, then Python values
            dtype = np.dtype(_SCALARS[item]).newbyteorder(self._endian)
            end = pos + count * dtype.itemsize
            return np.frombuffer(self._mv[pos:end], dtype).tolist(), end
        values = []
        if item == _STRING:  # the common large case (vocabularies, merges): no per-item views
            unpack, mv = struct.Struct(self._endian + "Q").unpack_from, self._mv
            for _ in range(count):
                (n,) = unpack(mv, pos)
                values.append(str(mv[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
            return values, pos
        for _ in range(count):  # arrays of arrays
            value, pos = self._value(item, pos)
            values.append(value)
        return values, pos

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], kind: GGMLQuantizationType,
                offset: int) -> GGUFTensor:
        shape = tuple(reversed(dims))
        block, type_size = GGML_QUANT_SIZES[kind]
        if kind in _PLAIN:
            dtype = np.dtype(_PLAIN[kind]).newbyteorder(self._endian)
        else:  # rows of quantised blocks, as bytes
            if shape[-1] % block:
                raise ValueError(f"{self.path}: tensor {name!r} row of {shape[-1]} is not a whole number of "
                                 f"{kind.name} blocks of {block}")
            dtype, shape = np.dtype(np.uint8), (*shape[:-1], shape[-1] // block * type_size)
        size = int(np.prod(shape)) * dtype.itemsize
        begin = start + offset
        if begin + size > len(self._buf):
            raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file")
        data = np.frombuffer(self._mv[begin : begin + size], dtype).reshape(shape)
        return GGUFTensor(name, kind, dims, data)
