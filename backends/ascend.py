"""The Huawei Ascend backend: the shared torch ops on an "npu" device through the torch_npu plug-in (CANN)."""

from __future__ import annotations

from sagellm.backends.base import Availability
from sagellm.backends.registry import register_backend
from sagellm.backends.torch_ops import TorchOpsBackend, plugin_availability


@register_backend
class AscendBackend(TorchOpsBackend):
    name = "ascend"
    device_type = "npu"
    collective_library = "hccl"

    @classmethod
    def availability(cls) -> Availability:
        return plugin_availability("torch_npu", "Huawei Ascend CANN", "npu")
