"""sageLLM hardware backends: a device plus a kernel table per backend, looked up by name.

`get_backend("auto" | "cpu" | "cuda" | "ascend" | "cambricon" | "hygon")` returns a ready backend; `list_backends()`
says which can run here and why not. Importing this package loads no vendor stack (triton, torch_npu, torch_mlu)."""

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.base import Availability, BackendUnavailableError, HardwareBackend
from sagellm.backends.kernel_contracts import REQUIRED_OPS, KernelTable
from sagellm.backends.registry import get_backend, list_backends, register_backend

__all__ = [
    "REQUIRED_OPS",
    "AttentionMetadata",
    "Availability",
    "BackendUnavailableError",
    "HardwareBackend",
    "KernelTable",
    "PrefillChunk",
    "get_backend",
    "list_backends",
    "register_backend",
]
