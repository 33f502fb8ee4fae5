"""Triton kernels for the CUDA backend; each module holds one kernel family and the Python launcher it is called by.

Importing this package imports triton and compiles nothing; set TRITON_INTERPRET=1 before the first import to run
the kernels on the CPU (the tests do)."""

from sagellm.backends.triton_kernels.gated_delta_rule import gated_delta_net
from sagellm.backends.triton_kernels.lora import add_lora
from sagellm.backends.triton_kernels.mxfp4_linear import Mxfp4Weight, mxfp4_linear, mxfp4_weight
from sagellm.backends.triton_kernels.paged_attention import paged_decode_attention
from sagellm.backends.triton_kernels.rmsnorm import add_rmsnorm, rmsnorm
from sagellm.backends.triton_kernels.rope import rope
from sagellm.backends.triton_kernels.silu_mul import silu_mul

__all__ = [
    "Mxfp4Weight",
    "add_lora",
    "add_rmsnorm",
    "gated_delta_net",
    "mxfp4_linear",
    "mxfp4_weight",
    "paged_decode_attention",
    "rmsnorm",
    "rope",
    "silu_mul",
]
