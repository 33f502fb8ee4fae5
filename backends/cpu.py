"""The CPU backend: the shared torch ops, with `linear` on weight layouts measured to be fastest on x86 CPUs.

A CPU LLM server is memory-bound at decode: every step streams every weight once. Measured on the 2-core AVX-512
machine this was written on (torch 2.13, MKL + oneDNN, fp32), oneDNN's matmul on a weight reordered once into its
blocked layout beats `F.linear` on the [out, in] weight and `torch.mm` on an [in, out] copy by 1.5-3x from two rows
up (batched decode, prefill), and matches them for one row on hidden-sized outputs. The exception is a single row
against a wide output (gate_up and the lm_head during batch-1 decode), where MKL's GEMV on a contiguous [in, out]
copy is 1.4-2x faster (2x for gate_up 576->3072 at 2 threads), so weights that wide keep that copy as well; the
vocabulary projection, wider still, is again oneDNN's (`GEMV_COPY_OUT`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sagellm.backends import torch_ops
from sagellm.backends.base import Availability, KernelTable
from sagellm.backends.registry import register_backend

# Outputs this wide (gate_up) also keep an [in, out] copy for one-row calls, where MKL's GEMV streams the weight
# fastest. A vocabulary projection (49152 wide) is one call big enough that oneDNN's two threads beat it (4.9 vs
# 6.0 ms for SmolLM2's lm_head at 2 threads), and its copy would cost another 113 MB.
GEMV_COPY_OUT = range(2048, 16384)
PACK_BATCH_HINT = 16  # rows oneDNN tunes the blocked layout for; measured as good at 1, 16 and 256 rows
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class CpuLinearWeight:
    packed: torch.Tensor  # [out, in], oneDNN-blocked (opaque mkldnn tensor) when the dtype allows, else dense
    rows: torch.Tensor | None  # [in, out] contiguous, only for outputs in GEMV_COPY_OUT


def pack_linear_weight(weight: torch.Tensor) -> CpuLinearWeight:
    weight = weight.to("cpu").contiguous()  # [N, K]
    rows = weight.t().contiguous() if weight.shape[0] in GEMV_COPY_OUT else None  # [K, N]
    if torch.backends.mkldnn.is_available() and weight.dtype in _ONEDNN_DTYPES:
        return CpuLinearWeight(torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT), rows)
    return CpuLinearWeight(weight, rows)


def linear(x: torch.Tensor, weight: CpuLinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] -> [T, N] (+ bias [N]) on a weight packed by `pack_linear_weight`."""
    if weight.rows is not None and x.shape[0] == 1:
        return torch.mm(x, weight.rows) if bias is None else torch.addmm(bias, x, weight.rows)  # [1, N]
    if weight.packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")  # [T, N]
    return F.linear(x, weight.packed, bias)


@register_backend
class CpuBackend(torch_ops.TorchOpsBackend):
    name = "cpu"
    device_type = "cpu"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def prepare_linear_weight(self, weight: torch.Tensor) -> CpuLinearWeight:
        return pack_linear_weight(weight)

    def kernels(self) -> KernelTable:
        return {**super().kernels(), "linear": linear}
