"""The Cambricon backend: the shared torch ops on an "mlu" device through the torch_mlu plug-in (Neuware)."""

from __future__ import annotations

from sagellm.backends.base import Availability
from sagellm.backends.registry import register_backend
from sagellm.backends.torch_ops import TorchOpsBackend, plugin_availability


@register_backend
class CambriconBackend(TorchOpsBackend):
    name = "cambricon"
    device_type = "mlu"
    collective_library = "cncl"

    @classmethod
    def availability(cls) -> Availability:
        return plugin_availability("torch_mlu", "Cambricon Neuware", "mlu")
