"""What makes two engines' KV bytes for the same tokens the same: the key under which a disk tier's blocks are shared.

Blocks of one model, laid out one way, computed by the same kernels, may be shared by any instance and any restart;
anything else must never be read, so the identity is conservative: the weights' own bytes (sampled, so a model of
GBs costs milliseconds; the path does not count: the same file copied elsewhere shares, another file at the same path
does not), the model's architecture, each payload's layout, the block size, the linears' dtype, the backend and the
kernels' instruction set (AVX-512 and AVX2 kernels round differently), and `KV_NUMERICS_VERSION`, raised whenever a
kernel that writes KV changes. The cache salt, a LoRA adapter and media are in each block's chained hash instead."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KV_NUMERICS_VERSION = 1
_WINDOWS = 16  # sampled windows of each weight file, besides its first and last MiB
_WINDOW_BYTES = 64 * 1024
_EDGE_BYTES = 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
_fingerprints: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime) -> a file's fingerprint


def tier_identity(
    source: Path, architecture: str, layouts: dict[str, int], block_size: int, dtype: str, backend: str, kernels: str
) -> dict[str, Any]:
    """The identity of an engine's tier blocks: `source`, the model's directory or file; `layouts`, each payload
    group's bytes per block (block_payloads.py)."""
    return {
        "numerics": KV_NUMERICS_VERSION,
        "weights": weights_fingerprint(source),
        "architecture": architecture,
        "layouts": layouts,
        "block_size": block_size,
        "dtype": dtype,
        "backend": backend,
        "kernels": kernels,
    }


def canonical(identity: Mapping[str, Any]) -> str:
    """The identity as the one JSON text both its digest and a disk tier's layout.json are made from."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)


def identity_digest(identity: Mapping[str, Any]) -> bytes:
    """The sha256 every block's header carries (block_file.py): a reader refuses a block of another identity."""
    return hashlib.sha256(canonical(identity).encode()).digest()


def weights_fingerprint(source: Path) -> str:
    """A digest of the model's files: config and tokenizer JSON whole, weight files sampled."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        if path.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{path.name}\0{_file_fingerprint(path)}\0".encode())
        elif path.suffix == ".json":
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _fingerprints:
        digest = hashlib.sha256(str(stat.st_size).encode())
        with path.open("rb") as file:
            for offset, length in _samples(stat.st_size):
                file.seek(offset)
                digest.update(file.read(length))
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


def _samples(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the parts read: the first and last MiB (headers, tensor tables) and evenly spaced windows."""
    if size <= 2 * _EDGE_BYTES + _WINDOWS * _WINDOW_BYTES:
        return [(0, size)]
    step = (size - _WINDOW_BYTES) // (_WINDOWS + 1)
    return [(0, _EDGE_BYTES), *((step * i, _WINDOW_BYTES) for i in range(1, _WINDOWS + 1)),
            (size - _EDGE_BYTES, _EDGE_BYTES)]  # fmt: skip


def default_disk_budget(directory: str | os.PathLike) -> int:
    """32 GiB, or half the free space of the directory's file system where that is less."""
    stat = os.statvfs(directory)
    return min(32 << 30, stat.f_bavail * stat.f_frsize // 2)
