"""Triton paged decode attention: one query token per sequence against its K/V in the block-paged cache.

One program per (sequence, kv head) walks the sequence's block table one cache block at a time with an online
softmax, serving all G query heads of the group at once, so each cached K/V block is read once per group (GQA) and
nothing is gathered or padded. Scores use broadcast-multiply-sum rather than tl.dot, so any group size works.

A sliding window (window > 0: the query, token L - 1, sees keys L - window .. L - 1) starts the walk at the block
holding the window's first key and masks the keys before it in that block, so a step reads O(window) of the cache.
A soft cap (softcap > 0: s -> softcap * tanh(s / softcap), Gemma 2) is applied to the scaled scores before the mask,
its tanh written with exp: triton has no tanh that both the interpreter and every GPU backend provide. Attention
sinks (gpt-oss: a logit per query head) join each head's softmax denominator at the end, exp(sink - running max)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    sinks_ptr,
    scale,
    window,
    softcap,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAPPED: tl.constexpr,
    SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM_P)
    t = tl.arange(0, BLOCK_SIZE)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g  # [G]

    q_off = seq * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale  # [G, D]

    context_len = tl.load(context_lens_ptr + seq)
    first = tl.where(window > 0, tl.maximum(context_len - window, 0), 0)  # the first key the query sees
    m = tl.full([GROUP_P], float("-inf"), tl.float32)  # running max
    s = tl.zeros([GROUP_P], tl.float32)  # running sum of exp
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
    for i in range(first // BLOCK_SIZE, tl.cdiv(context_len, BLOCK_SIZE)):  # every block has a key the query sees
        block = tl.load(block_tables_ptr + seq * stride_tb + i).to(tl.int64)
        position = i * BLOCK_SIZE + t
        t_ok = (position < context_len) & (position >= first)  # [BS]
        kv_off = block * stride_cb + t[:, None] * stride_ct + kv_head * stride_ch + d[None, :]
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [BS, D]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [BS, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BS]
        if CAPPED:  # softcap * tanh(scores / softcap), tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1
            e = tl.exp(-2.0 * tl.abs(scores / softcap))
            scores = tl.where(scores < 0, -softcap, softcap) * (1.0 - e) / (1.0 + e)
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # [G]
        p = tl.exp(scores - m_new[:, None])  # [G, BS]
        alpha = tl.exp(m - m_new)  # [G]
        s = s * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [G, D]
        m = m_new

    if SINKS:  # the sink's share of the denominator; it takes no value
        sink = tl.load(sinks_ptr + heads, mask=g_ok, other=float("-inf")).to(tl.float32)  # [G]
        s = s + tl.exp(sink - m)
    out = acc / s[:, None]
    o_off = seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(
    q: torch.Tensor, cache: PagedKv, block_tables: torch.Tensor, context_lens: torch.Tensor, spec: AttentionSpec
) -> torch.Tensor:
    """`PagedDecodeAttention` (backends/kernel_contracts.py), on caches of one layout with a unit-stride head dim
    and a power-of-two block size."""
    batch, num_q_heads, head_dim = q.shape
    k_cache, v_cache = cache
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("paged_decode_attention needs caches of one layout with a unit-stride head dim")
    if block_size & (block_size - 1):
        raise ValueError(f"paged_decode_attention needs a power-of-two block size, got {block_size}")
    group = num_q_heads // num_kv_heads
    sinks, softcap = spec.sinks, spec.softcap
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, Hq, D]
    _paged_decode_kernel[(batch, num_kv_heads)](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        q if sinks is None else sinks.contiguous(),  # any pointer when there are none: the kernel does not read it
        spec.scale,
        int(spec.window),
        float(softcap),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_P=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        CAPPED=softcap > 0,
        SINKS=sinks is not None,
    )
    return out
