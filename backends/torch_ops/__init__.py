"""The torch implementation of every op in the kernel table, written once for any device torch runs on.

The CPU backend runs these directly (with its own `linear`), the accelerator plug-in backends (Ascend, Cambricon,
Hygon) run them on their device, and the CUDA backend swaps in triton kernels for the per-token ops and the decode
half of attention while reusing the prefill half from here. It also holds `TorchOpsBackend`, the one base class for
"these ops on torch device X", so a new torch device is a class with a name, a device type and an availability check
(`PluginBackend` checks a device an out-of-tree torch plug-in adds).

The rooms: the ops on hidden states (`token_ops`), attention over the paged KV cache (`attention`) and the memory it
reuses (`gather_buffers`), the kernel table and the backend base class (`backend`); callers import from here.
"""

from sagellm.backends.torch_ops.attention import (
    attention,
    paged_decode_attention,
    prefill_attention,
    write_kv,
)
from sagellm.backends.torch_ops.backend import TORCH_KERNELS, PluginBackend, TorchOpsBackend
from sagellm.backends.torch_ops.gather_buffers import DECODE_KV_HEADROOM, GatherBuffers
from sagellm.backends.torch_ops.token_ops import (
    add,
    add_rmsnorm,
    embedding,
    gelu_tanh_mul,
    head_rmsnorm,
    linear,
    moe,
    rmsnorm,
    rope,
    sigmoid,
    silu_mul,
)

__all__ = [
    "DECODE_KV_HEADROOM",
    "TORCH_KERNELS",
    "GatherBuffers",
    "PluginBackend",
    "TorchOpsBackend",
    "add",
    "add_rmsnorm",
    "attention",
    "embedding",
    "gelu_tanh_mul",
    "head_rmsnorm",
    "linear",
    "moe",
    "paged_decode_attention",
    "prefill_attention",
    "rmsnorm",
    "rope",
    "sigmoid",
    "silu_mul",
    "write_kv",
]
