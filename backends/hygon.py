"""The Hygon DCU backend: the shared torch ops on a ROCm (HIP) build of torch, whose devices appear as "cuda"."""

from __future__ import annotations

import torch

from sagellm.backends.base import Availability
from sagellm.backends.registry import register_backend
from sagellm.backends.torch_ops import TorchOpsBackend


@register_backend
class HygonBackend(TorchOpsBackend):
    name = "hygon"
    device_type = "cuda"  # HIP devices keep torch's "cuda" device type
    collective_library = "nccl"  # RCCL, under NCCL's name in ROCm builds of torch

    @classmethod
    def availability(cls) -> Availability:
        build = f"torch {torch.__version__}"
        if torch.version.hip is None:
            return Availability(False, f"needs a ROCm build of torch (Hygon DCU / DTK) — {build} is not one")
        if not torch.cuda.is_available():
            return Availability(False, f"needs a Hygon DCU — {build} (HIP {torch.version.hip}) sees no device")
        name = torch.cuda.get_device_name(0)
        return Availability(True, f"{build}, HIP {torch.version.hip}, {torch.cuda.device_count()}x {name}")
