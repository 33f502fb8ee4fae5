"""The NVIDIA CUDA backend: torch (cuBLAS, SDPA) for linear, embedding and prefill attention; triton kernels for
paged decode attention, RMSNorm, add+RMSNorm, RoPE, SiLU-mul, the Gated DeltaNet's delta rule and linears on MXFP4
weights (gpt-oss's experts), which stay GGUF blocks on the device; other GGUF kinds are dequantized at load.

Triton is imported only when the kernel table is built, so registering and listing this backend works on machines
without it. `attention` is the shared torch op with the triton kernel plugged in as its decode half."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from sagellm.backends import torch_ops
from sagellm.backends.base import Availability
from sagellm.backends.kernel_contracts import KernelTable
from sagellm.backends.quantized import QuantizedWeight
from sagellm.backends.registry import register_backend


@register_backend
class CudaBackend(torch_ops.TorchOpsBackend):
    name = "cuda"
    collective_library = "nccl"
    device_type = "cuda"

    def __init__(self) -> None:
        super().__init__()
        # The engine's float32 is float32: cuDNN's convolutions (the audio tower's, a Gated DeltaNet prefill's) would
        # otherwise round their inputs to TF32's 10-bit mantissa, as torch lets them by default (its matmuls do not).
        torch.backends.cudnn.allow_tf32 = False

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

    def prepare_block_weight(self, parts: list[QuantizedWeight], int8_activations: bool = False) -> Any | None:
        """An Mxfp4Weight on the device when every part is MXFP4, else None (the floats)."""
        from sagellm.backends import triton_kernels

        return triton_kernels.mxfp4_weight(parts, self.device)

    def kernels(self) -> KernelTable:
        from sagellm.backends import triton_kernels

        table = super().kernels()
        table.update(
            linear=functools.partial(linear, blocks=triton_kernels.mxfp4_linear),
            rmsnorm=triton_kernels.rmsnorm,
            add_rmsnorm=triton_kernels.add_rmsnorm,
            rope=triton_kernels.rope,
            silu_mul=triton_kernels.silu_mul,
            paged_decode_attention=triton_kernels.paged_decode_attention,
            gated_delta_net=triton_kernels.gated_delta_net,
            add_lora=triton_kernels.add_lora,
            attention=functools.partial(
                torch_ops.attention, decode=triton_kernels.paged_decode_attention, buffers=torch_ops.GatherBuffers()
            ),
        )
        return table


def linear(
    x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None, *, blocks: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """The torch op on a tensor (`prepare_linear_weight`), `blocks` (the triton MXFP4 linear) on the Mxfp4Weight
    `prepare_block_weight` made: the two forms this backend packs. A bf16 weight (dtype=bfloat16) takes the fp32
    activations cast to bf16 (cuBLAS sums in fp32) and gives fp32 back: the rest of the model stays fp32."""
    if not isinstance(weight, torch.Tensor):
        return blocks(x, weight, bias)
    if weight.dtype == x.dtype:
        return torch_ops.linear(x, weight, bias)
    low_bias = None if bias is None else bias.to(weight.dtype)
    return torch_ops.linear(x.to(weight.dtype), weight, low_bias).to(x.dtype)
