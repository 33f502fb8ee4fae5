"""The NVIDIA CUDA backend: torch (cuBLAS, SDPA) for linear, embedding and prefill attention; triton kernels for
paged decode attention, RMSNorm, add+RMSNorm, RoPE, SiLU-mul and the Gated DeltaNet's delta rule.

Triton is imported only when the kernel table is built, so registering and listing this backend works on machines
without it. `attention` is the shared torch op with the triton kernel plugged in as its decode half."""

from __future__ import annotations

import functools
import importlib.util

import torch

from sagellm.backends import torch_ops
from sagellm.backends.base import Availability, KernelTable
from sagellm.backends.registry import register_backend


@register_backend
class CudaBackend(torch_ops.TorchOpsBackend):
    name = "cuda"
    collective_library = "nccl"
    device_type = "cuda"

    @classmethod
    def availability(cls) -> Availability:
        build = f"torch {torch.__version__}"
        if torch.version.hip is not None:
            return Availability(False, f"needs an NVIDIA CUDA build of torch — {build} is a ROCm build (use 'hygon')")
        if not torch.cuda.is_available():
            kind = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no device visible"
            return Availability(False, f"needs an NVIDIA GPU — no CUDA device: {build} is {kind}")
        if importlib.util.find_spec("triton") is None:
            return Availability(False, "needs triton for its kernels — not installed")
        name = torch.cuda.get_device_name(0)
        return Availability(True, f"{build}, CUDA {torch.version.cuda}, {torch.cuda.device_count()}x {name}")

    def kernels(self) -> KernelTable:
        from sagellm.backends import triton_kernels

        table = super().kernels()
        table.update(
            rmsnorm=triton_kernels.rmsnorm,
            add_rmsnorm=triton_kernels.add_rmsnorm,
            rope=triton_kernels.rope,
            silu_mul=triton_kernels.silu_mul,
            paged_decode_attention=triton_kernels.paged_decode_attention,
            gated_delta_net=triton_kernels.gated_delta_net,
            attention=functools.partial(
                torch_ops.attention, decode=triton_kernels.paged_decode_attention, buffers=torch_ops.GatherBuffers()
            ),
        )
        return table
