"""LoRA adapters' updates on the native path (lora.c): one linear's at a time (the CPU backend's `add_lora` op, for
the steps that run op by op: prefill, more rows than the fused layers take), and the structs with which the fused
decoder layers (decoder_layers.c) add every layer's after its linears, in the same call.

Each row reads its own slot's A and B only, so a batch of rows on four adapters costs what one adapter costs; the
torch op (torch_ops/lora.py) multiplies every row by every slot and masks, the reference this is checked against.
float32 only: the CPU's linear outputs and the engine's stacked slots are float32."""

from __future__ import annotations

import ctypes

import torch

from sagellm.backends.decoder_layer import DECODER_LINEARS, LoraPart
from sagellm.backends.native.ops import NativeKernels
from sagellm.backends.native.tensor_fits import fits_dense, fits_rows

F32 = torch.float32
MAX_PARTS = 3  # block_weight.h's: a fused linear's parts (q, k, v)


class _Part(ctypes.Structure):
    """kernels.h's `lora_part`."""

    _fields_ = [("a", ctypes.c_void_p), ("b_t", ctypes.c_void_p), ("begin", ctypes.c_int64), ("width", ctypes.c_int64)]


class _Linear(ctypes.Structure):
    """decoder_layers.c's `lora_linear`."""

    _fields_ = [("parts", _Part * MAX_PARTS), ("count", ctypes.c_int64)]


class LayerLora(ctypes.Structure):
    """decoder_layers.c's `layer_lora`: a layer's linears' adapter parts."""

    _fields_ = [(name, _Linear) for name in DECODER_LINEARS]


def parts_fit(parts: tuple[LoraPart, ...], in_features: int) -> bool:
    """What lora.c reads: at most MAX_PARTS parts of contiguous fp32 A [S, R, in_features] and B^T [S, R, width],
    every part of the same slots and rank."""
    if not parts or len(parts) > MAX_PARTS:
        return False
    slots, rank = parts[0].a.shape[:2]
    return all(
        fits_dense(p.a, p.b_t)
        and p.a.shape == (slots, rank, in_features)
        and p.b_t.shape == (slots, rank, p.end - p.begin)
        for p in parts
    )


def layer_lora(lora: dict[str, tuple[LoraPart, ...]]) -> LayerLora:
    """A layer's struct from its adapted linears' parts (a linear without adapters: no parts)."""
    return LayerLora(*(_linear(lora.get(name, ())) for name in DECODER_LINEARS))


def _linear(parts: tuple[LoraPart, ...]) -> _Linear:
    structs = [_Part(p.a.data_ptr(), p.b_t.data_ptr(), p.begin, p.end - p.begin) for p in parts]
    return _Linear((_Part * MAX_PARTS)(*structs), len(parts))


def add_lora(
    native: NativeKernels,
    out: torch.Tensor,
    x: torch.Tensor,
    row_slots: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    num_threads: int,
) -> torch.Tensor | None:
    """`AddLora` (backends/kernel_contracts.py) in one native call: out [T, N] += each row's update, in place, and
    returned; None when the tensors are not what lora.c reads (then the torch op runs). `lora_b` [S, N, R] must be
    the transposed view of a contiguous B^T [S, R, N], as the engine's slots hand it over."""
    b_t = lora_b.transpose(1, 2)
    if not (fits_rows(out, x) and fits_dense(row_slots, dtype=torch.int64) and row_slots.shape == (x.shape[0],)):
        return None
    part = LoraPart(lora_a, b_t, 0, out.shape[1])
    if not parts_fit((part,), x.shape[1]) or out.shape[0] != x.shape[0]:
        return None
    rank = lora_a.shape[1]
    shrunk = torch.empty((x.shape[0], rank), dtype=F32)
    native.library.lora_add_f32(
        ctypes.byref(_linear((part,)).parts[0]), 1, x.data_ptr(), x.stride(0), x.shape[1], out.data_ptr(),
        out.stride(0), row_slots.data_ptr(), x.shape[0], rank, shrunk.data_ptr(), num_threads,
    )  # fmt: skip
    return out
