"""The contract between the runtime and a hardware backend: a device plus a kernel table (op name -> kernel, each
kernel's signature and shapes declared once in kernel_contracts.py), and how the backend packs linear weights for its
`linear`. Adding hardware means writing those kernels, not touching the model or the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sagellm.backends.kernel_contracts import KernelTable
from sagellm.backends.quantized import QuantizedWeight
from sagellm.common.errors import InvalidInput, Unavailable


class BackendUnavailableError(Unavailable, RuntimeError):
    """The backend is registered but its software stack or device is missing on this machine."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not, or what was found ("torch 2.13.0, 2 threads")


class HardwareBackend(ABC):
    name: ClassVar[str]
    # The library the ranks of a model split over this backend's devices talk through (runtime/comm/collectives.py).
    collective_library: ClassVar[str] = "gloo"

    def __init__(self) -> None:
        status = self.availability()
        if not status.available:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {status.reason}")

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def kernels(self) -> KernelTable: ...

    def select_device(self, index: int) -> None:
        """Makes device `index` this process's current one (an engine given `device_ids`)."""
        raise InvalidInput(f"backend {self.name!r} has no numbered devices to select")

    def linear_dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why this backend's linears cannot compute in `dtype` (None: they can); float32 always can."""
        return None if dtype in (torch.float32, torch.bfloat16) else f"{self.name} linears take float32 or bfloat16"

    def prepare_linear_weight(self, weight: torch.Tensor) -> Any:
        """Packs a [out, in] weight into the layout this backend's `linear` reads fastest."""
        return weight.to(self.device).contiguous()

    def int8_activations_problem(self, kinds: set[str]) -> str | None:
        """Why this backend cannot round the inputs of linears on GGUF blocks of `kinds` (the model's, as kept) to
        int8 (EngineConfig.int8_activations), or None where it can for some of them."""
        return f"the {self.name} backend has no linears on int8 activations (the cpu backend's native kernels do)"

    def prepare_block_weight(self, parts: list[QuantizedWeight], int8_activations: bool = False) -> Any | None:
        """A linear weight this backend's `linear` reads from GGUF blocks (its parts' rows stacked: a fused q/k/v
        may mix kinds, as a Q4_K_M file's does), or None when it does not read them: the caller then packs the
        dequantized floats with `prepare_linear_weight`. Held in one form: no float copy beside the blocks.
        `int8_activations`: the linear rounds x to int8 where its kind allows (only asked of a backend whose
        int8_activations_problem is None)."""
        return None
