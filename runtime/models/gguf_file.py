"""Reads a GGUF file (llama.cpp's format) as the loader needs it: quickly, without copying, never past its end.

gguf-py's GGUFReader makes a numpy view of every element of every metadata array (SmolLM2's 49k tokens and 49k
merges: ~1.2 M views, 3.4 s) where the loader needs only the token count. Here an array of numbers is one
`np.frombuffer`, an array of strings is stepped over with its count kept and decoded only when asked for
(`StringArray`), and every tensor's data is a view of one read-only memory map of the file. Each read is checked
against the file's size, so a truncated or corrupt file raises `CorruptGGUF` saying what is wrong where.

Little-endian files of GGUF versions 2 and 3 (what llama.cpp writes); type codes and block sizes are gguf-py's."""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from sagellm.common.errors import InvalidInput

V = GGUFValueType
VERSIONS = (2, 3)
ALIGNMENT_KEY = "general.alignment"
_SCALARS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.UINT64: "<Q", V.INT64: "<q", V.FLOAT32: "<f", V.FLOAT64: "<d", V.BOOL: "<?",
}  # fmt: skip
_STRUCTS = {kind: struct.Struct(fmt) for kind, fmt in _SCALARS.items()}
_DTYPES = {kind: np.dtype(fmt.replace("?", "b1")) for kind, fmt in _SCALARS.items()}  # arrays of numbers
_U32, _U64 = _STRUCTS[V.UINT32], _STRUCTS[V.UINT64]
_HEADER = struct.Struct("<IIQQ")  # magic, version, tensor count, key/value count
# The fewest bytes one item can take, to refuse an absurd count at once instead of after looping to the file's end.
_MIN_STRING, _MIN_ARRAY, _MIN_KEY_VALUE, _MIN_TENSOR_INFO = 8, 12, 12, 24


class CorruptGGUF(InvalidInput):
    """The file is truncated or not valid GGUF; the message says what was being read and at which byte."""


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings left undecoded: its length is known at once, and `tolist()` decodes it (the
    tokenizer's 49k tokens take tens of ms), paid only by a caller that needs the strings."""

    buffer: mmap.mmap = field(repr=False)
    start: int  # the first string's length field
    count: int
    key: str

    def __len__(self) -> int:
        return self.count

    def tolist(self) -> list[str]:
        strings, pos = [], self.start  # bounds were checked when the file was parsed
        for _ in range(self.count):
            (n,) = _U64.unpack_from(self.buffer, pos)
            strings.append(_utf8(self.buffer[pos + 8 : pos + 8 + n], self.key, pos))
            pos += 8 + n
        return strings


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, outermost first (the file lists dimensions innermost first)
    data: np.ndarray = field(repr=False)  # uint8 [bytes]: as stored, a read-only view of the mapped file


@dataclass(frozen=True)
class GGUFFile:
    version: int
    # Scalars as Python values; arrays of numbers as read-only numpy arrays, of strings as `StringArray`, of arrays
    # as lists of those.
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]  # in file order
    alignment: int
    data_offset: int  # where the tensor data start
    buffer: mmap.mmap = field(repr=False)  # the mapped file every tensor's data views


def read_gguf(path: Path) -> GGUFFile:
    """The parsed file, its tensors' data mapped (not read) from disk; raises CorruptGGUF for a bad file."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER.size:
            raise CorruptGGUF(f"the file has {size} bytes, fewer than a GGUF header's {_HEADER.size}")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    return _Parser(buffer).file()


class _Parser:
    """Reads the file front to back; `take` is the one place that moves forward, and it checks the file's end."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer, self.pos, self.size = buffer, 0, len(buffer)

    def file(self) -> GGUFFile:
        magic, version, tensor_count, kv_count = _HEADER.unpack_from(self.buffer, self.take(_HEADER.size, "header"))
        if magic != GGUF_MAGIC:
            raise CorruptGGUF(f"the file starts with {self.buffer[:4]!r}, not the GGUF magic b'GGUF'")
        if version & 0xFFFF == 0:
            raise CorruptGGUF(f"big-endian GGUF files are not supported (version field {version:#x})")
        if version not in VERSIONS:
            raise CorruptGGUF(f"GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
        metadata: dict[str, Any] = {}
        for _ in range(self.count(kv_count, _MIN_KEY_VALUE, "key/value pairs")):
            key = self.string("a metadata key")
            if key in metadata:
                raise CorruptGGUF(f"metadata key {key} appears twice (second at byte {self.pos})")
            kind = self.unpack(_U32, key)
            metadata[key] = self.value(kind, key)
            if key == ALIGNMENT_KEY:
                _check_alignment(kind, metadata[key])
        infos = [self.tensor_info() for _ in range(self.count(tensor_count, _MIN_TENSOR_INFO, "tensor infos"))]
        alignment = metadata.get(ALIGNMENT_KEY, GGUF_DEFAULT_ALIGNMENT)
        data_offset = -(-self.pos // alignment) * alignment
        tensors: dict[str, GGUFTensor] = {}
        for name, kind, shape, offset, n_bytes in infos:
            if name in tensors:
                raise CorruptGGUF(f"tensor {name} appears twice")
            start = data_offset + offset
            if start + n_bytes > self.size:
                end = f"the file's end at byte {self.size}"
                raise CorruptGGUF(f"tensor {name}'s data (bytes {start}-{start + n_bytes}) run past {end}")
            data = np.frombuffer(self.buffer, np.uint8, n_bytes, start)
            tensors[name] = GGUFTensor(name, kind, shape, data)
        return GGUFFile(version, metadata, tensors, alignment, data_offset, self.buffer)

    def tensor_info(self) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]:
        """(name, kind, numpy shape, data offset, data bytes) of one tensor info."""
        name = self.string("a tensor name")
        n_dims = self.unpack(_U32, name)
        dims = struct.unpack_from(f"<{n_dims}Q", self.buffer, self.take(8 * n_dims, f"{name}'s dimensions"))
        raw_kind, offset = self.unpack(_U32, name), self.unpack(_U64, name)
        try:
            kind = GGMLQuantizationType(raw_kind)
            block, block_bytes = GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise CorruptGGUF(f"tensor {name} has unknown type {raw_kind}") from None
        if dims and dims[0] % block:
            raise CorruptGGUF(f"tensor {name}'s rows of {dims[0]} are not whole {kind.name} blocks of {block}")
        return name, kind, tuple(reversed(dims)), offset, math.prod(dims) // block * block_bytes

    def value(self, kind: int, key: str) -> Any:
        if kind in _STRUCTS:
            return self.unpack(_STRUCTS[kind], key)
        if kind == V.STRING:
            return self.string(key)
        if kind == V.ARRAY:
            return self.array(key)
        raise CorruptGGUF(f"metadata {key} has unknown value type {kind} (at byte {self.pos - 4})")

    def array(self, key: str) -> Any:
        kind, count = self.unpack(_U32, key), self.unpack(_U64, key)
        if kind in _DTYPES:
            dtype = _DTYPES[kind]
            return np.frombuffer(self.buffer, dtype, count, self.take(count * dtype.itemsize, key))
        if kind == V.STRING:
            start = self.pos
            self.skip_strings(self.count(count, _MIN_STRING, f"strings of {key}"), key)
            return StringArray(self.buffer, start, count, key)
        if kind == V.ARRAY:
            return [self.array(key) for _ in range(self.count(count, _MIN_ARRAY, f"arrays of {key}"))]
        raise CorruptGGUF(f"metadata {key} is an array of unknown value type {kind}")

    def skip_strings(self, count: int, key: str) -> None:
        pos, buffer, unpack = self.pos, self.buffer, _U64.unpack_from
        try:
            for _ in range(count):  # the one per-element loop: ~0.1 us a string
                pos += 8 + unpack(buffer, pos)[0]
        except struct.error:
            pos = self.size + 1
        if pos > self.size:
            raise CorruptGGUF(f"metadata {key}: its {count} strings from byte {self.pos} end past the file's end")
        self.pos = pos

    def string(self, what: str) -> str:
        n = self.unpack(_U64, what)
        start = self.take(n, what)
        return _utf8(self.buffer[start : start + n], what, start)

    def unpack(self, fmt: struct.Struct, what: str) -> Any:
        return fmt.unpack_from(self.buffer, self.take(fmt.size, what))[0]

    def count(self, count: int, least_bytes: int, what: str) -> int:
        """`count`, refused if that many items could not fit in the rest of the file."""
        if count * least_bytes > self.size - self.pos:
            raise CorruptGGUF(f"{count} {what} at byte {self.pos} cannot fit in the file's {self.size} bytes")
        return count

    def take(self, n: int, what: str) -> int:
        """Steps over the next `n` bytes, returning where they start."""
        start = self.pos
        if start + n > self.size:
            raise CorruptGGUF(f"{what}: {n} bytes at byte {start} end past the file's end at byte {self.size}")
        self.pos = start + n
        return start


def _check_alignment(kind: int, value: Any) -> None:
    if kind != V.UINT32 or value <= 0 or value & (value - 1):
        raise CorruptGGUF(f"{ALIGNMENT_KEY} must be a power of two stored as UINT32, got {value!r} (type {kind})")


def _utf8(raw: bytes, what: str, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptGGUF(f"{what} at byte {at} is not UTF-8 ({e.reason})") from None
