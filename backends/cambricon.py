"""The Cambricon backend: the shared torch ops on an "mlu" device through the torch_mlu plug-in (Neuware)."""

from __future__ import annotations

from sagellm.backends.registry import register_backend
from sagellm.backends.torch_ops import PluginBackend


@register_backend
class CambriconBackend(PluginBackend):
    name = "cambricon"
    device_type = "mlu"
    collective_library = "cncl"
    plugin, stack = "torch_mlu", "Cambricon Neuware"
