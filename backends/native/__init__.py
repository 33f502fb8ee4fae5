"""Native (plain C) CPU kernels for small-batch decode, compiled with the system compiler on first use.

`NativeKernels.load()` gives the ops (or None where no library can be built, or with SAGELLM_NATIVE_KERNELS=0); the
CPU backend's kernel table calls them for the shapes where they beat torch and runs the torch ops otherwise."""

from sagellm.backends.native import isa
from sagellm.backends.native.block_layout import InterleavedBlocks, interleave
from sagellm.backends.native.build import DISABLE_ENV, NativeBuildError, native_library
from sagellm.backends.native.ops import NativeKernels, NativeShapeError
from sagellm.backends.native.tensor_fits import (
    fits_decode_attention,
    fits_dense,
    fits_heads,
    fits_prefill_attention,
    fits_rows,
    prefill_scratch_size,
)

__all__ = [
    "DISABLE_ENV",
    "InterleavedBlocks",
    "NativeBuildError",
    "NativeKernels",
    "NativeShapeError",
    "fits_decode_attention",
    "fits_dense",
    "fits_heads",
    "fits_prefill_attention",
    "fits_rows",
    "interleave",
    "isa",
    "native_library",
    "prefill_scratch_size",
]
