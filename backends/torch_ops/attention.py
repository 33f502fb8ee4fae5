"""The torch attention over the paged KV cache: each new token's K/V written to its slot, then the decode tokens
against their cached context in one batched call and each prefill chunk causally over its sequence (a picture's
run of image tokens both ways, for a model whose pictures attend so: `PrefillChunk.bidirectional`). `attention` takes
the parts a device swaps (the CUDA backend's triton decode kernel, the CPU's native ones).

A layer's sliding `window` is a mask SDPA takes; its score `softcap` and attention `sinks` (its AttentionSpec's; what
the three mean: kernel_contracts.py) change the softmax, which SDPA cannot, so a capped or sinking layer takes the
explicit matmul-softmax path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.kernel_contracts import KvWrite, PagedDecodeAttention, PrefillAttention
from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec
from sagellm.backends.torch_ops.gather_buffers import GatherBuffers, cached_tokens, visibility_mask


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: PagedKv, slot_mapping: torch.Tensor) -> None:
    """`KvWrite` (kernel_contracts.py) by index_copy_."""
    for new, layer in ((k, cache.k), (v, cache.v)):
        layer.view(-1, *layer.shape[2:]).index_copy_(0, slot_mapping, new)  # [num_blocks * block_size, Hk, D]


def paged_decode_attention(
    q: torch.Tensor,
    cache: PagedKv,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    spec: AttentionSpec,
    *,
    buffers: GatherBuffers | None = None,
) -> torch.Tensor:
    """`PagedDecodeAttention` (kernel_contracts.py), all sequences in one batched call.

    Each sequence's K/V is gathered into a [B, L, Hk, D] tensor padded to the longest context, and the G query heads
    sharing a kv head attend as G rows of one [B, Hk, G, D] query, so GQA needs no repeated K/V. Padded positions are
    masked out, so the caches must hold finite values there (allocate them zeroed)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = cache.k.shape[2]
    # The table's width bounds the context (the runner sends exactly the blocks the longest context needs), so no
    # per-layer reduction over context_lens, and no host-device sync, is needed to size the gather.
    if buffers is None:
        keys = cached_tokens(cache.k, block_tables, None, "k").unflatten(0, (batch, -1))  # [B, L, Hk, D]
        values = cached_tokens(cache.v, block_tables, None, "v").unflatten(0, (batch, -1))
    else:
        keys = buffers.decode_kv("k", cache.k, block_tables, context_lens)  # [B, L, Hk, D]
        values = buffers.decode_kv("v", cache.v, block_tables, context_lens)
    visible = visibility_mask(context_lens, keys.shape[1], buffers)  # [B, 1, 1, L] or None
    window, sinks = spec.window, spec.sinks
    if window:
        position = torch.arange(keys.shape[1], device=q.device)
        recent = (position >= context_lens[:, None] - window).view(batch, 1, 1, -1)  # [B, 1, 1, L]
        visible = recent if visible is None else visible & recent
    group = num_q_heads // num_kv_heads
    out = _attend(
        q.unflatten(1, (num_kv_heads, group)),  # [B, Hk, G, D]
        keys.transpose(1, 2),  # [B, Hk, L, D]
        values.transpose(1, 2),
        visible,
        False,
        spec.scale,
        spec.softcap,
        None if sinks is None else sinks.view(num_kv_heads, group, 1),  # [Hk, G, 1]: one per query row
    )  # [B, Hk, G, D]
    return out.flatten(1, 2)  # [B, Hq, D]


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: PagedKv,
    chunk: PrefillChunk,
    spec: AttentionSpec,
    *,
    buffers: GatherBuffers | None = None,
) -> torch.Tensor:
    """`PrefillAttention` (kernel_contracts.py).

    A chunk that starts the sequence attends to its fresh K/V directly; a later chunk reads its earlier context from
    the cache (which already holds this chunk too), and query i sees keys up to position context_len - n + i. Inputs
    are 4-D with K/V broadcast over each group's query heads: that keeps torch on its fused (flash) CPU kernel, which
    3-D inputs or `enable_gqa` would drop for the unfused math path (3-4x slower at 256-1024 tokens)."""
    n, ctx = chunk.query_len, chunk.context_len
    if ctx == n:
        keys, values = k, v
    else:
        block_size = cache.k.shape[1]
        table = chunk.block_table[: -(-ctx // block_size)]
        keys = cached_tokens(cache.k, table, buffers, "k")[:ctx]  # [ctx, Hk, D]
        values = cached_tokens(cache.v, table, buffers, "v")[:ctx]
    window, sinks = spec.window, spec.sinks
    windowed = 0 < window < ctx
    causal = ctx == n and not windowed and not chunk.bidirectional
    mask = None
    if not causal:
        rows = torch.arange(n, device=q.device)[:, None] + (ctx - n)  # [n, 1]: each query's position
        position = torch.arange(ctx, device=q.device)[None, :]  # [1, ctx]
        mask = position <= _last_keys(rows, chunk.bidirectional)  # [n, ctx]
        if windowed:
            mask &= position > rows - window
    num_kv_heads, group = keys.shape[1], q.shape[1] // keys.shape[1]
    out = _attend(
        q.transpose(0, 1).unflatten(0, (num_kv_heads, group)),  # [Hk, G, n, D]
        keys.transpose(0, 1)[:, None].expand(-1, group, -1, -1),  # [Hk, G, ctx, D], stride 0 over G: no copy
        values.transpose(0, 1)[:, None].expand(-1, group, -1, -1),
        mask,
        causal,
        spec.scale,
        spec.softcap,
        None if sinks is None else sinks.view(num_kv_heads, group, 1, 1),  # [Hk, G, 1, 1]
    )  # [Hk, G, n, D]
    return out.flatten(0, 1).transpose(0, 1)  # [n, Hq, D]


def _last_keys(rows: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The last key position each query at `rows` [n, 1] sees: its own, or for one inside a picture's run [s, e)
    that attends both ways (Gemma 3), the run's last (e - 1)."""
    last = rows
    for start, end in runs:
        inside = (rows >= start) & (rows < end)
        last = torch.where(inside, end - 1, last)
    return last


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T, masked) v over [..., n, D] x [..., L, D]; through SDPA unless the scores are capped or
    a sink (a logit broadcast over [..., n, 1]) joins each row's softmax as a column of its own, dropped after."""
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [..., n, L]
    if softcap:
        scores.div_(softcap).tanh_().mul_(softcap)
    if causal:
        n, length = scores.shape[-2:]
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril_(length - n)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)
    column = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)  # [..., n, 1]
    probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: PagedKv,
    meta: AttentionMetadata,
    spec: AttentionSpec,
    *,
    decode: PagedDecodeAttention = paged_decode_attention,
    buffers: GatherBuffers | None = None,
    write: KvWrite = write_kv,
    prefill: PrefillAttention = prefill_attention,
) -> torch.Tensor:
    """`Attention` (kernel_contracts.py): `write`, then the decode tokens in one `decode` call and each prefill chunk
    in one `prefill` call. `decode`, `write` and `prefill` are the parts a device swaps (the CUDA backend passes its
    triton decode kernel, the CPU its native ones); `buffers` serve the prefill gathers (bind the same ones into
    `decode` to share them)."""
    write(k, v, cache, meta.slot_mapping)
    nd = meta.num_decode_tokens
    decoded = None
    if nd:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        if buffers is not None:
            buffers.decode_continues = meta.decode_continues
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        decoded = decode(q[:nd], cache, tables, lens, spec)
        if nd == q.shape[0]:  # a decode-only step, the steady state: no staging copy
            return decoded
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if decoded is not None:
        out[:nd] = decoded
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        out[rows] = prefill(q[rows], k[rows], v[rows], cache, chunk, spec, buffers=buffers)
    return out
