"""Triton Gated DeltaNet (Qwen3.5's linear attention) for the CUDA backend: torch_ops/linear_attention.py's op with its
decode convolution and its delta rule as kernels, same signature, same float32 arithmetic.

Decode rows take two launches. The convolution step reads each row's window from its slot, writes the shifted window
back and leaves the convolved, SiLU'd row in a float32 buffer; it is a launch of its own because a row's q/k channels
serve several value heads, so no later program could shift their window without racing the others' reads. Then the
delta rule: one program per (row, value head, block of Dv) keeps a [Dk, BLOCK_V] tile of the row's state S in
registers and L2-norms q and k and computes the gates itself (Dk values each, cheaper than elementwise launches).

A prefill chunk's convolution is torch's conv1d over [window ; inputs], as in the reference; its delta rule is the
same kernel looping over the chunk's tokens inside each program, one launch for all chunks. Sequential over tokens
where the reference uses the chunked form: simple and exact, though a long prompt costs one step per token. A
chunk starts from its source slot (its own, or a prefix checkpoint's) or from zeros at position 0 (so a freed slot is
never cleared), ends in its state slot, and copies S into a checkpoint's slot after its first n tokens.

Programs of a launch share nothing, so every sequence of a batch must hold its own slot and no chunk may read a slot
another one writes: what state_slots.py and the prefix cache give."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.layer_specs import DeltaNetSpec
from sagellm.backends.torch_ops.linear_attention import seed_decode_states

BLOCK_V = 8  # FLA's choice for its fused recurrent kernel (one warp, a [Dk, 8] tile); not tuned here
BLOCK_C = 256  # channels per program of the convolution step


@triton.jit
def _conv_step_kernel(
    out_ptr,
    x_ptr,
    conv_states_ptr,
    slots_ptr,
    weight_ptr,
    stride_x,
    stride_o,
    stride_ss,
    stride_sc,
    stride_w,
    CHANNELS: tl.constexpr,
    WIDTH: tl.constexpr,
    WIDTH_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BC]
    j = tl.arange(0, WIDTH_P)  # taps: the window's K-1 inputs, then this row's
    c_ok = c < CHANNELS
    slot = tl.load(slots_ptr + row).to(tl.int64)
    window_ptrs = conv_states_ptr + slot * stride_ss + c[:, None] * stride_sc  # + tap, [BC, 1]
    x = tl.load(x_ptr + row * stride_x + c, mask=c_ok, other=0.0).to(tl.float32)  # [BC]
    last = WIDTH - 1
    held = tl.load(window_ptrs + j[None, :], mask=c_ok[:, None] & (j[None, :] < last), other=0.0).to(tl.float32)
    taps = tl.where(j[None, :] == last, x[:, None], held)  # [BC, K]
    w = tl.load(weight_ptr + c[:, None] * stride_w + j[None, :], mask=c_ok[:, None] & (j[None, :] < WIDTH), other=0.0)
    y = tl.sum(taps * w.to(tl.float32), axis=1)  # [BC]
    tl.store(out_ptr + row * stride_o + c, y / (1.0 + tl.exp(-y)), mask=c_ok)
    # the window after this row: taps 1 .. K-1
    shifted = tl.load(window_ptrs + j[None, :] + 1, mask=c_ok[:, None] & (j[None, :] + 1 < last), other=0.0)
    shifted = tl.where(j[None, :] + 1 == last, x[:, None], shifted.to(tl.float32))
    store_ok = c_ok[:, None] & (j[None, :] < last)
    tl.store(window_ptrs + j[None, :], shifted.to(conv_states_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _delta_rule_kernel(
    out_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    a_log_ptr,
    dt_bias_ptr,
    states_ptr,
    slots_ptr,
    chunks_ptr,
    num_chunks,
    stride_x,
    stride_o,
    stride_a,
    stride_b,
    stride_ss,
    stride_sh,
    stride_sk,
    NUM_K_HEADS: tl.constexpr,
    NUM_V_HEADS: tl.constexpr,
    TILED: tl.constexpr,
    DK: tl.constexpr,
    DK_P: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    DECODE: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)  # value head
    # its key head: each serves consecutive value heads, or every NUM_K_HEADS-th one when tiled (a GGUF's order)
    kh = h % NUM_K_HEADS if TILED else h // (NUM_V_HEADS // NUM_K_HEADS)
    dk = tl.arange(0, DK_P)
    dv = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    dk_ok = dk < DK
    dv_ok = dv < DV
    tile_ok = dk_ok[:, None] & dv_ok[None, :]
    tile = dk[:, None] * stride_sk + dv[None, :]  # [DK, BV] offsets within one head's S
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    head_ptrs = states_ptr + h * stride_sh + tile
    if DECODE:  # row `seq`: one token, from its slot
        start = seq
        length = 1
        load_ok = tile_ok
        checkpoint_at = -1
        checkpoint_slot = slot
        source = slot
    else:  # chunk `seq`: chunks_ptr's column (see _chunk_row)
        start = tl.load(chunks_ptr + seq)
        length = tl.load(chunks_ptr + num_chunks + seq)
        source = tl.load(chunks_ptr + 2 * num_chunks + seq)
        load_ok = tl.where(source >= 0, tile_ok, False)  # -1: zeros, the chunk starts at position 0
        source = tl.maximum(source, 0)
        checkpoint_at = tl.load(chunks_ptr + 3 * num_chunks + seq)
        checkpoint_slot = tl.load(chunks_ptr + 4 * num_chunks + seq)
    s = tl.load(head_ptrs + source * stride_ss, mask=load_ok, other=0.0).to(tl.float32)  # [DK, BV]
    neg_a = -tl.exp(tl.load(a_log_ptr + h).to(tl.float32))
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    for i in range(length):
        if i == checkpoint_at:
            tl.store(head_ptrs + checkpoint_slot * stride_ss, s.to(states_ptr.dtype.element_ty), mask=tile_ok)
        row = start + i
        x_row = x_ptr + row * stride_x
        q = tl.load(x_row + kh * DK + dk, mask=dk_ok, other=0.0)  # [DK]
        k = tl.load(x_row + (NUM_K_HEADS + kh) * DK + dk, mask=dk_ok, other=0.0)  # [DK]
        v = tl.load(x_row + 2 * NUM_K_HEADS * DK + h * DV + dv, mask=dv_ok, other=0.0)  # [BV]
        q = q / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6) * (DK**-0.5)
        k = k / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6)
        gate = tl.load(a_ptr + row * stride_a + h).to(tl.float32) + dt_bias
        softplus = tl.where(gate > 20.0, gate, tl.log(1.0 + tl.exp(tl.minimum(gate, 20.0))))  # torch's threshold
        beta = 1.0 / (1.0 + tl.exp(-tl.load(b_ptr + row * stride_b + h).to(tl.float32)))
        s = s * tl.exp(neg_a * softplus)
        recalled = tl.sum(s * k[:, None], axis=0)  # [BV]: what S already holds for k
        s = s + k[:, None] * ((v - recalled) * beta)[None, :]
        tl.store(out_ptr + row * stride_o + h * DV + dv, tl.sum(s * q[:, None], axis=0), mask=dv_ok)
    if checkpoint_at == length:
        tl.store(head_ptrs + checkpoint_slot * stride_ss, s.to(states_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(head_ptrs + slot * stride_ss, s.to(states_ptr.dtype.element_ty), mask=tile_ok)


def gated_delta_net(
    mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, meta: AttentionMetadata, spec: DeltaNetSpec
) -> torch.Tensor:
    """`GatedDeltaNet` (backends/kernel_contracts.py), on tensors with unit-stride channels, heads, taps and Dv."""
    conv_weight, head_k_dim, head_v_dim = spec.conv_weight, spec.head_k_dim, spec.head_v_dim
    conv_states, ssm_states = spec.states
    if any(t.stride(-1) != 1 for t in (mixed_qkv, a, b, conv_states, ssm_states, conv_weight)):
        raise ValueError("gated_delta_net needs unit-stride channels, heads, taps and Dv")
    tokens, channels = mixed_qkv.shape
    num_v_heads = b.shape[1]
    x = torch.empty(tokens, channels, dtype=torch.float32, device=mixed_qkv.device)  # convolved, SiLU'd
    out = torch.empty(tokens, num_v_heads * head_v_dim, dtype=torch.float32, device=mixed_qkv.device)
    nd = meta.num_decode_tokens
    if nd:
        seed_decode_states(meta, spec.states)
        width = conv_weight.shape[1]
        _conv_step_kernel[(nd, triton.cdiv(channels, BLOCK_C))](
            x,
            mixed_qkv,
            conv_states,
            meta.decode_state_slots,
            conv_weight,
            mixed_qkv.stride(0),
            x.stride(0),
            conv_states.stride(0),
            conv_states.stride(1),
            conv_weight.stride(0),
            CHANNELS=channels,
            WIDTH=width,
            WIDTH_P=triton.next_power_of_2(width),
            BLOCK=BLOCK_C,
        )
    for chunk in meta.prefills:
        _conv_chunk(mixed_qkv, x, chunk, conv_states, conv_weight)

    def delta_rule(count: int, slots: torch.Tensor, chunks: torch.Tensor, decode: bool) -> None:
        _delta_rule_kernel[(count, num_v_heads, triton.cdiv(head_v_dim, BLOCK_V))](
            out,
            x,
            a,
            b,
            spec.a_log,
            spec.dt_bias,
            ssm_states,
            slots,
            chunks,
            count,
            x.stride(0),
            out.stride(0),
            a.stride(0),
            b.stride(0),
            ssm_states.stride(0),
            ssm_states.stride(1),
            ssm_states.stride(2),
            NUM_K_HEADS=spec.num_k_heads,
            NUM_V_HEADS=num_v_heads,
            TILED=spec.tiled_value_heads,
            DK=head_k_dim,
            DK_P=triton.next_power_of_2(head_k_dim),
            DV=head_v_dim,
            BLOCK=BLOCK_V,
            DECODE=decode,
            num_warps=1,
        )

    if nd:  # a decode launch reads no chunk table
        delta_rule(nd, meta.decode_state_slots, meta.decode_state_slots, decode=True)
    if meta.prefills:
        columns = list(zip(*(_chunk_row(c) for c in meta.prefills)))
        chunks = torch.tensor(columns, dtype=torch.int64).to(x.device)  # [6, P]
        delta_rule(len(meta.prefills), chunks[5], chunks, decode=False)
    return out


def _chunk_row(chunk: PrefillChunk) -> tuple[int, int, int, int, int, int]:
    """The delta rule kernel's view of a chunk: (first row, tokens, the slot it starts from (-1: zeros), the
    checkpoint's tokens in (-1: none), the checkpoint's slot, the slot it ends in)."""
    at, keep = chunk.checkpoint if chunk.checkpoint is not None else (-1, chunk.state_slot)
    return chunk.query_start, chunk.query_len, chunk.source_slot, at, keep, chunk.state_slot


def _conv_chunk(
    mixed_qkv: torch.Tensor, x: torch.Tensor, chunk: PrefillChunk, conv_states: torch.Tensor, weight: torch.Tensor
) -> None:
    """A prefill chunk through the causal depthwise convolution and SiLU into x's rows; the windows after it (and
    after its checkpoint's tokens) into the slots."""
    rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
    width = conv_states.shape[2]
    window = torch.zeros_like(conv_states[0]) if chunk.source_slot < 0 else conv_states[chunk.source_slot]  # [C, K-1]
    joined = torch.cat([window.float(), mixed_qkv[rows].float().T], dim=1)  # [C, K-1+n]
    x[rows] = F.silu(F.conv1d(joined[None], weight.float()[:, None, :], groups=joined.shape[0])[0]).T
    if chunk.checkpoint is not None:
        at, keep = chunk.checkpoint
        conv_states[keep] = joined[:, at : at + width]
    conv_states[chunk.state_slot] = joined[:, chunk.query_len : chunk.query_len + width]
