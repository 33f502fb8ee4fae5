"""Gated DeltaNet (Qwen3.5, Qwen3-Next): linear attention whose memory is a recurrent state per sequence, not a KV
cache.

A layer keeps two states per sequence, in its state slot (runtime/engine/state_slots.py): the causal depthwise
convolution's window, the last K-1 of its inputs [C, K-1], and the delta rule's matrix S [Hv, Dk, Dv]. Per token t,
with q and k L2-normed, q scaled by Dk^-0.5, beta = sigmoid(b) and the decay g = -exp(A_log) * softplus(a + dt_bias):

    S <- S * exp(g_t);  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

A decode row does exactly that. A prefill chunk does it for many tokens at once by the chunked form (Yang et al.,
"Gated Delta Networks"): within a chunk of 64 tokens the updates are one unit-triangular solve and a few matmuls, and
only chunk boundaries are sequential. Both compute in float32, as the reference does.

A prefill chunk that starts at position 0 starts from zero states, so a freed slot never needs clearing; one that
continues a sequence starts from its `source_slot`: the sequence's own (chunked prefill) or a prefix checkpoint's (a
prefix-cache hit, which is read, not changed). Its final states go to the sequence's `state_slot`. A chunk may name a
checkpoint: after its first `n` tokens, both states are copied into that slot as well (the prefix cache's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.layer_caches import RecurrentStates
from sagellm.backends.layer_specs import DeltaNetSpec

CHUNK = 64  # tokens per chunk of the chunked delta rule: its triangular solves are CHUNK x CHUNK


def gated_delta_net(
    mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, meta: AttentionMetadata, spec: DeltaNetSpec
) -> torch.Tensor:
    """`GatedDeltaNet` (backends/kernel_contracts.py): the decode rows by the recurrent rule, each prefill chunk by
    the chunked form."""
    num_v_heads = b.shape[1]
    out = mixed_qkv.new_empty(mixed_qkv.shape[0], num_v_heads * spec.head_v_dim, dtype=torch.float32)
    dims = (spec.num_k_heads, spec.head_k_dim, num_v_heads, spec.head_v_dim, spec.tiled_value_heads)
    nd, states = meta.num_decode_tokens, spec.states
    if nd:
        seed_decode_states(meta, states)
        slots = meta.decode_state_slots  # [nd]
        decay, beta = _gates(a[:nd], b[:nd], spec.a_log, spec.dt_bias)  # [nd, Hv] each
        x = _conv_step(mixed_qkv[:nd].float(), states.conv, slots, spec.conv_weight)  # [nd, C]
        q, k, v = _split_heads(x, dims)  # [nd, Hv, Dk], [nd, Hv, Dk], [nd, Hv, Dv]
        state = states.ssm.index_select(0, slots)  # [nd, Hv, Dk, Dv]
        o = recurrent_gated_delta_rule(q, k, v, decay, beta, state)  # state advanced in place
        states.ssm.index_copy_(0, slots, state)
        out[:nd] = o.flatten(1)
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        out[rows] = _prefill_chunk(chunk, mixed_qkv[rows], b[rows], a[rows], states, spec, dims)
    return out


def seed_decode_states(meta: AttentionMetadata, states: RecurrentStates) -> None:
    """Before the decode rows: a row whose token is its sequence's first (a one-token prompt) starts from zero
    states, and one that follows a prefix hit from the checkpoint's (`meta.decode_state_seeds`), both copied into the
    row's own slot, which the decode then advances."""
    for slot, source in meta.decode_state_seeds:
        states.copy_slot(source, slot)


def _prefill_chunk(
    chunk: PrefillChunk,
    mixed_qkv: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    states: RecurrentStates,
    spec: DeltaNetSpec,
    dims: tuple[int, int, int, int, bool],
) -> torch.Tensor:
    """One prefill chunk of `gated_delta_net`'s batch, its rows of mixed_qkv [n, C], b and a [n, Hv] (dims: Hk, Dk,
    Hv, Dv, tiled): its slot's states advanced, its checkpoint taken; returns its output [n, Hv * Dv]."""
    fresh = chunk.source_slot < 0  # starts at position 0
    inputs = mixed_qkv.float()  # [n, C]
    conv_states, ssm_states = states
    window = conv_states.new_zeros(conv_states.shape[1:]) if fresh else conv_states[chunk.source_slot]
    joined = torch.cat([window.T, inputs])  # [K-1+n, C]: the window, then this chunk's inputs
    x = _conv_prefill(joined, spec.conv_weight)  # [n, C]
    q, k, v = _split_heads(x, dims)
    decay, beta = _gates(a, b, spec.a_log, spec.dt_bias)  # [n, Hv] each
    state = ssm_states.new_zeros(ssm_states.shape[1:]) if fresh else ssm_states[chunk.source_slot].clone()
    pieces = [(0, chunk.query_len)]
    if chunk.checkpoint is not None:
        at, _ = chunk.checkpoint
        pieces = [(0, at), (at, chunk.query_len)]
    outputs = []
    for start, end in pieces:
        if end > start:
            span = slice(start, end)
            outputs.append(chunk_gated_delta_rule(q[span], k[span], v[span], decay[span], beta[span], state))
        if chunk.checkpoint is not None and end == chunk.checkpoint[0]:
            _, keep = chunk.checkpoint
            ssm_states[keep] = state
            conv_states[keep] = _window_after(joined, end, conv_states.shape[2])
    ssm_states[chunk.state_slot] = state
    conv_states[chunk.state_slot] = _window_after(joined, chunk.query_len, conv_states.shape[2])
    return torch.cat(outputs).flatten(1)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`GatedRmsNorm` (backends/kernel_contracts.py), in float32."""
    n, d = x.shape[0], weight.shape[0]
    normed = F.rms_norm(x.view(n, -1, d).float(), (d,), weight.float(), eps)  # [T, Hv, Dv]
    return (normed * F.silu(z.view(n, -1, d).float())).view(n, -1)  # [T, Hv * Dv]


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token per row: q, k [N, Hv, Dk] (normed, q scaled), v [N, Hv, Dv], decay and beta [N, Hv]; `state`
    [N, Hv, Dk, Dv] advanced in place. Returns o [N, Hv, Dv]."""
    state.mul_(decay.exp()[..., None, None])
    predicted = torch.einsum("nhkv,nhk->nhv", state, k)  # what the state already recalls for k
    delta = (v - predicted) * beta[..., None]  # [N, Hv, Dv]
    state.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("nhkv,nhk->nhv", state, q)


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """The same rule over n tokens of one sequence: q, k [n, Hv, Dk], v [n, Hv, Dv], decay and beta [n, Hv];
    `state` [Hv, Dk, Dv] advanced in place over all n. Returns o [n, Hv, Dv]."""
    out = []
    for start in range(0, q.shape[0], CHUNK):
        span = slice(start, start + CHUNK)
        out.append(_one_chunk(q[span], k[span], v[span], decay[span], beta[span], state))
    return torch.cat(out)


def _one_chunk(q, k, v, decay, beta, state) -> torch.Tensor:
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [Hv, c, D]
    log_decay = decay.T.cumsum(-1)  # [Hv, c]: log of the decay from the chunk's start through each token
    c = q.shape[1]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # between[h, i, j]: the decay from token j to token i (i >= j), 0 above the diagonal
    between = (log_decay[:, :, None] - log_decay[:, None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta.T[..., None]  # [Hv, c, Dk]
    # The chunk's updates as one unit lower-triangular system (the "UT transform"): row i removes what the earlier
    # tokens of the chunk already wrote for k_i.
    system = (k_beta @ k.transpose(1, 2) * between).tril(-1)  # [Hv, c, c]
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta.T[..., None], k_beta * log_decay.exp()[..., None]], dim=-1)  # [Hv, c, Dv + Dk]
    solved = torch.linalg.solve_triangular(system + eye, rhs, upper=False, unitriangular=True)
    values, decayed_keys = solved.split([v.shape[-1], k.shape[-1]], dim=-1)  # [Hv, c, Dv], [Hv, c, Dk]
    new_values = values - decayed_keys @ state  # the corrections the chunk writes, [Hv, c, Dv]
    within = (q @ k.transpose(1, 2)) * between  # [Hv, c, c]
    out = (q * log_decay.exp()[..., None]) @ state + within @ new_values  # [Hv, c, Dv]
    last = log_decay[:, -1:]  # [Hv, 1]
    state.mul_(last.exp()[..., None]).add_((k * (last - log_decay).exp()[..., None]).transpose(1, 2) @ new_values)
    return out.transpose(0, 1)  # [c, Hv, Dv]


def _gates(a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor):
    """(decay in log space, beta), each [T, Hv]."""
    decay = -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return decay, b.float().sigmoid()


def _split_heads(x: torch.Tensor, dims: tuple[int, int, int, int, bool]):
    """The convolved [N, C] as q, k [N, Hv, Dk] (L2-normed, q scaled; each key head serves Hv/Hk consecutive value
    heads, or every Hk-th one when tiled) and v [N, Hv, Dv]."""
    num_k_heads, dk, num_v_heads, dv, tiled = dims
    n = x.shape[0]
    q, k, v = x.split([num_k_heads * dk, num_k_heads * dk, num_v_heads * dv], dim=-1)
    q, k = (_l2norm(t.reshape(n, num_k_heads, dk)) for t in (q, k))
    if num_v_heads != num_k_heads:
        r = num_v_heads // num_k_heads
        q, k = (t.repeat(1, r, 1) if tiled else t.repeat_interleave(r, dim=1) for t in (q, k))
    return q * dk**-0.5, k, v.reshape(n, num_v_heads, dv)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _conv_step(x: torch.Tensor, conv_states: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One token per row through the causal depthwise convolution (then SiLU): x [N, C]; each row's window
    [C, K-1] read from and written back to its slot."""
    window = torch.cat([conv_states.index_select(0, slots), x[:, :, None]], dim=-1)  # [N, C, K]
    conv_states.index_copy_(0, slots, window[:, :, 1:])
    return F.silu((window * weight.float()).sum(-1))  # [N, C]


def _conv_prefill(joined: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """joined [K-1+n, C] (the window, then n inputs) through the causal depthwise convolution, then SiLU: [n, C]."""
    channels = joined.shape[1]
    out = F.conv1d(joined.T[None], weight.float()[:, None, :], groups=channels)  # [1, C, n]
    return F.silu(out[0].T)


def _window_after(joined: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """The convolution's window once the first n inputs of `joined` (after its window of `width`) are consumed:
    [C, width]."""
    return joined[n : n + width].T
