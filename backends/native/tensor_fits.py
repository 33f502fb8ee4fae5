"""What the native kernels accept: the limits compiled into the C code and the tensor layouts it reads.

The C code trusts its arguments, so the CPU backend's dispatch asks these `fits_*` predicates before calling a native
op and runs the torch op otherwise; the limits mirror the C sources' constants (named beside each) and must change
with them. Kept apart from the wrappers (ops.py) so the dispatch, the fused decoder layers and the experts ask the
same questions without reaching into how each op is called."""

from __future__ import annotations

import torch

from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import DeltaNetSpec

F32 = torch.float32
MAX_HEAD_DIM = 256  # decode_attention.c and prefill_attention.c MAX_HEAD_DIM
MAX_QUERY_GROUP = 48  # prefill_attention.c MAX_QUERIES: query heads per kv head it takes
KEY_CHUNK = 32  # prefill_attention.c KEY_CHUNK
MAX_DELTA_HEAD_DIM = 256  # delta_rule.c MAX_HEAD_DIM: the Gated DeltaNet's Dk and Dv
MAX_CONV_WIDTH = 8  # delta_rule.c MAX_WIDTH: its convolution's K


def fits_rows(*tensors: torch.Tensor) -> bool:
    """fp32 [T, N] with unit-stride rows (any row stride), as the norm and SiLU kernels read them."""
    return all(t.dtype == F32 and t.dim() == 2 and t.stride(1) == 1 for t in tensors)


def slots_inside(slots: torch.Tensor, count: int) -> bool:
    """Every one of `slots` a state slot of `count` (a wrong one would make a kernel write outside the states)."""
    return slots.numel() == 0 or (int(slots.min()) >= 0 and int(slots.max()) < count)


def fits_strided_heads(x: torch.Tensor) -> bool:
    """fp32 [T, H, D] whose heads are unit-stride (tokens and heads any distance apart): what head_rmsnorm reads."""
    return x.dtype == F32 and x.dim() == 3 and x.stride(2) == 1


def fits_heads(*tensors: torch.Tensor) -> bool:
    """fp32 [T, H, D] with the heads of a row packed (any row stride): views of a fused qkv output qualify."""
    return all(t.dtype == F32 and t.dim() == 3 and t.stride()[1:] == (t.shape[2], 1) for t in tensors)


def fits_dense(*tensors: torch.Tensor, dtype: torch.dtype = F32) -> bool:
    """Contiguous tensors of `dtype`: weights, the rotary table, the caches, index tensors."""
    return all(t.dtype == dtype and t.is_contiguous() for t in tensors)


def fits_decode_attention(q: torch.Tensor, cache: PagedKv, block_tables: torch.Tensor, lens: torch.Tensor) -> bool:
    """What `paged_decode_attention` reads: packed fp32 heads of a size the C code vectorizes (a multiple of 8, at
    most MAX_HEAD_DIM), contiguous fp32 caches and int32 tables."""
    d = q.shape[-1]
    return (
        d % 8 == 0
        and d <= MAX_HEAD_DIM
        and fits_heads(q)
        and fits_dense(*cache)
        and fits_dense(block_tables, lens, dtype=torch.int32)
    )


def fits_prefill_attention(q: torch.Tensor, cache: PagedKv, table: torch.Tensor) -> bool:
    """What `paged_prefill_attention` reads: packed fp32 query heads of a size a multiple of 16 (at most MAX_HEAD_DIM),
    at most MAX_QUERY_GROUP of them per kv head, contiguous fp32 caches and an int32 block table."""
    d = q.shape[-1]
    return (
        d % 16 == 0
        and d <= MAX_HEAD_DIM
        and q.shape[1] // cache.k.shape[2] <= MAX_QUERY_GROUP
        and fits_heads(q)
        and fits_dense(*cache)
        and fits_dense(table, dtype=torch.int32)
    )


def fits_delta_rule(mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, spec: DeltaNetSpec) -> bool:
    """What `gated_delta_net` reads: fp32 rows of mixed_qkv, b and a (any row stride: views of a fused projection
    qualify), contiguous fp32 states and weights (conv_weight, a_log, dt_bias), heads of at most MAX_DELTA_HEAD_DIM
    and a convolution of at most MAX_CONV_WIDTH."""
    conv_weight = spec.conv_weight
    return (
        max(spec.head_k_dim, spec.head_v_dim) <= MAX_DELTA_HEAD_DIM
        and conv_weight.dim() == 2
        and conv_weight.shape[1] <= MAX_CONV_WIDTH
        and fits_rows(mixed_qkv, b, a)
        and fits_dense(*spec.states, conv_weight, spec.a_log, spec.dt_bias)
    )


def prefill_scratch_size(
    context_len: int, num_kv_heads: int, head_dim: int, query_len: int | None = None, window: int = 0
) -> int:
    """Floats of scratch `paged_prefill_attention` transposes a context's keys into: whole chunks per kv head, with
    a `window` only those from the chunk holding the lowest key the first of the `query_len` queries sees (without a
    query_len, all: enough for any chunk of the context)."""
    n = query_len or context_len
    first_chunk = max(0, context_len - n - window + 1) // KEY_CHUNK if window > 0 else 0  # prefill_attention.c's c0
    return num_kv_heads * (-(-context_len // KEY_CHUNK) - first_chunk) * KEY_CHUNK * head_dim
