"""The torch ops as a backend: their kernel table (`TORCH_KERNELS`), `TorchOpsBackend`, the one base class for "these
ops on torch device X", and `PluginBackend` for a device an out-of-tree torch plug-in adds."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import ClassVar

import torch

from sagellm.backends.base import Availability, HardwareBackend
from sagellm.backends.kernel_contracts import KernelTable
from sagellm.backends.torch_ops import token_ops, vision
from sagellm.backends.torch_ops.attention import attention, paged_decode_attention
from sagellm.backends.torch_ops.gather_buffers import GatherBuffers
from sagellm.backends.torch_ops.linear_attention import gated_delta_net, gated_rmsnorm
from sagellm.backends.torch_ops.lora import add_lora

TORCH_KERNELS: KernelTable = {
    "embedding": token_ops.embedding,
    "rmsnorm": token_ops.rmsnorm,
    "add_rmsnorm": token_ops.add_rmsnorm,
    "head_rmsnorm": token_ops.head_rmsnorm,
    "linear": token_ops.linear,
    "rope": token_ops.rope,
    "silu_mul": token_ops.silu_mul,
    "gelu_tanh_mul": token_ops.gelu_tanh_mul,
    "add": token_ops.add,
    "sigmoid": token_ops.sigmoid,
    "moe": token_ops.moe,
    "attention": attention,
    "paged_decode_attention": paged_decode_attention,
    "gated_delta_net": gated_delta_net,
    "gated_rmsnorm": gated_rmsnorm,
    "add_lora": add_lora,
    "layernorm": vision.layernorm,
    "gelu": vision.gelu,
    "quick_gelu": vision.quick_gelu,
    "encoder_attention": vision.encoder_attention,
}


class TorchOpsBackend(HardwareBackend):
    """The torch ops (`TORCH_KERNELS`) on one torch device type; subclasses name the device and say if it is present."""

    device_type: ClassVar[str]

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def select_device(self, index: int) -> None:
        if self.device_type == "cpu":
            super().select_device(index)
        getattr(torch, self.device_type).set_device(index)

    def kernels(self) -> KernelTable:
        """The torch ops, with attention bound to gather buffers of this table's own."""
        buffers = GatherBuffers()
        decode = functools.partial(paged_decode_attention, buffers=buffers)
        attend = functools.partial(attention, decode=decode, buffers=buffers)
        return {**TORCH_KERNELS, "paged_decode_attention": decode, "attention": attend}


class PluginBackend(TorchOpsBackend):
    """The torch ops on the device an out-of-tree torch plug-in adds (`torch.<device_type>`): present when the plug-in
    `plugin` (a module of the vendor's software `stack`) is installed, imports and sees a device. It is imported only
    if installed, and a failed import is reported instead of raised."""

    plugin: ClassVar[str]
    stack: ClassVar[str]

    @classmethod
    def availability(cls) -> Availability:
        module, stack = cls.plugin, cls.stack
        if importlib.util.find_spec(module) is None:
            return Availability(False, f"needs {module} ({stack}) — not installed")
        try:
            importlib.import_module(module)
        except Exception as exc:  # vendor plug-ins fail on a driver/toolkit mismatch at import time
            return Availability(False, f"needs a working {module} ({stack}) — import failed: {exc}")
        device_module = getattr(torch, cls.device_type, None)
        if device_module is None or not device_module.is_available():
            return Availability(False, f"needs a {stack} device — {module} is installed but sees none")
        return Availability(True, f"torch {torch.__version__}, {module}, {device_module.device_count()} device(s)")
