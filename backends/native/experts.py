"""A mixture of experts' MLP as one native call (moe.c) for steps of a few rows: routing, the held experts' block
linears, their activation and the weighted sum, without the ~40 torch ops a layer the op makes around its linears.

Built once per layer from its experts' GGUF blocks (their pointers in a ctypes array), so a step passes only its
rows, the router and the biases."""

from __future__ import annotations

import torch

from sagellm.backends.layer_specs import MoeSpec
from sagellm.backends.native.block_layout import InterleavedBlocks
from sagellm.backends.native.block_weight import BlockWeight, block_weight, fits_blocks
from sagellm.backends.native.ops import NativeKernels
from sagellm.backends.native.tensor_fits import fits_dense, fits_rows

ACTIVATIONS = ("silu", "swiglu_oai")  # moe.c's, in its order
F32 = torch.float32


def routing_fits(
    router: torch.Tensor,
    router_bias: torch.Tensor | None,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    held: int,
    inter: int,
    top_k: int,
    activation: str,
) -> bool:
    """What moe.c reads besides the experts: a dense fp32 router [E, H] (and bias [E]), the held experts' biases
    stacked ([held, 2I], [held, H]), 0 < top_k <= E, an activation it has."""
    experts, h = router.shape
    sizes = ((router_bias, (experts,)), (gate_up_bias, (held, 2 * inter)), (down_bias, (held, h)))
    return (
        fits_dense(router)
        and activation in ACTIVATIONS
        and 0 < top_k <= experts
        and all(b is None or (b.shape == size and fits_dense(b)) for b, size in sizes)
    )


class NativeExperts:
    """`(x, spec) -> out | None` over the experts given to `build` (a layer's MoeSpec holds the same ones), each
    projection a tuple of InterleavedBlocks."""

    def __init__(
        self,
        native: NativeKernels,
        gate_up: list[tuple[InterleavedBlocks, ...]],
        down: list[tuple[InterleavedBlocks, ...]],
    ) -> None:
        self._lib = native.library
        self._keep = gate_up, down  # the blocks whose addresses the structs hold
        self._gate_up = (BlockWeight * len(gate_up))(*map(block_weight, gate_up))
        self._down = (BlockWeight * len(down))(*map(block_weight, down))
        self.held = len(gate_up)
        self.hidden, self.inter = down[0][0].out_features, down[0][0].in_features
        self._workspace = torch.empty(0, dtype=F32)  # grown to the most rows seen, never shrunk

    @classmethod
    def build(
        cls,
        native: NativeKernels,
        gate_up: list[tuple[InterleavedBlocks, ...]],
        down: list[tuple[InterleavedBlocks, ...]],
    ) -> NativeExperts | None:
        """The experts when every projection is blocks the kernels read, all of one shape; else None."""
        if not gate_up or len(gate_up) != len(down) or not down[0]:
            return None
        hidden, inter = down[0][0].out_features, down[0][0].in_features
        fits = all(fits_blocks(g, 2 * inter, hidden) for g in gate_up)
        return cls(native, gate_up, down) if fits and all(fits_blocks(d, hidden, inter) for d in down) else None

    def __call__(self, x: torch.Tensor, spec: MoeSpec) -> torch.Tensor | None:
        """The MLP of x [T, H] routed as `spec` says (its experts: the ones given to `build`), or None for what moe.c
        does not take (the torch op then runs)."""
        router, top_k, activation = spec.router, spec.top_k, spec.activation
        rows, h, i, experts = x.shape[0], self.hidden, self.inter, router.shape[0]
        biases = (spec.router_bias, spec.gate_up_bias, spec.down_bias)
        shapes_fit = fits_rows(x) and x.shape[1] == h and router.dim() == 2 and router.shape[1] == h
        if not (shapes_fit and routing_fits(router, *biases, self.held, i, top_k, activation)):
            return None
        size = self._lib.moe_workspace(h, i, experts, rows)
        if self._workspace.numel() < size:
            self._workspace = torch.empty(size, dtype=F32)
        out = torch.empty((rows, h), dtype=F32)  # [T, H]

        def address(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        self._lib.moe_f32(
            x.data_ptr(),
            x.stride(0),
            rows,
            router.data_ptr(),
            address(spec.router_bias),
            experts,
            top_k,
            int(spec.normalize),
            spec.first_expert,
            self.held,
            self._gate_up,
            self._down,
            address(spec.gate_up_bias),
            address(spec.down_bias),
            h,
            i,
            ACTIVATIONS.index(activation),
            spec.alpha,
            spec.limit,
            out.data_ptr(),
            self._workspace.data_ptr(),
            torch.get_num_threads(),
        )
        return out
