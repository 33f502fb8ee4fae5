"""The Huawei Ascend backend: the shared torch ops on an "npu" device through the torch_npu plug-in (CANN)."""

from __future__ import annotations

from sagellm.backends.registry import register_backend
from sagellm.backends.torch_ops import PluginBackend


@register_backend
class AscendBackend(PluginBackend):
    name = "ascend"
    device_type = "npu"
    collective_library = "hccl"
    plugin, stack = "torch_npu", "Huawei Ascend CANN"
