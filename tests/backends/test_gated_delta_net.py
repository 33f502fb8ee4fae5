"""The Gated DeltaNet op against transformers' own Qwen3.5 functions (its torch chunked and recurrent delta rules,
its causal convolutions): a prefill in one chunk, a prefill cut in pieces that carry the states through a slot, a
checkpoint taken mid-chunk, and decode rows of several sequences at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.layer_caches import RecurrentStates
from sagellm.backends.layer_specs import DeltaNetSpec
from sagellm.backends.torch_ops.linear_attention import gated_delta_net, gated_rmsnorm

qwen3_5 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

HK, DK, HV, DV, K = 2, 8, 4, 6, 4
C = 2 * HK * DK + HV * DV


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv_weight": torch.randn(C, K, generator=g) * 0.5,
        "a_log": torch.rand(HV, generator=g).add(0.1).log(),
        "dt_bias": torch.randn(HV, generator=g),
    }


def _spec(w, states: RecurrentStates) -> DeltaNetSpec:
    return DeltaNetSpec(states, **w, num_k_heads=HK, head_k_dim=DK, head_v_dim=DV)


def _inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g), torch.randn(n, HV, generator=g), torch.randn(n, HV, generator=g)


def _reference(qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, w) -> torch.Tensor:
    """transformers' layer core over one whole sequence from zero states: [n, Hv * Dv]."""
    x = qwen3_5.causal_conv1d_fn(qkv.T[None], w["conv_weight"], None, activation="silu")[0].T  # [n, C]
    n = x.shape[0]
    q, k, v = x.split([HK * DK, HK * DK, HV * DV], dim=-1)
    beta = b.sigmoid()[None]
    g = (-w["a_log"].exp() * F.softplus(a + w["dt_bias"]))[None]
    out, _ = qwen3_5.torch_chunk_gated_delta_rule(
        q.reshape(1, n, HK, DK), k.reshape(1, n, HK, DK), v.reshape(1, n, HV, DV), g=g, beta=beta,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    return out[0].reshape(n, -1)


def _states(slots: int = 4):
    return RecurrentStates(torch.zeros(slots, C, K - 1), torch.zeros(slots, HV, DK, DV))


def _prefill(qkv, b, a, start: int, n: int, slot: int, states, w, checkpoint=None, source: int | None = None):
    """Prefill of tokens [start, start + n) into `slot`, starting from `source`'s states (default: the slot's own,
    or zeros at position 0)."""
    source = (slot if start else -1) if source is None else source
    meta = AttentionMetadata(slot_mapping=torch.zeros(n, dtype=torch.int64), block_size=16)
    table = torch.zeros(1, dtype=torch.int32)
    meta.prefills = [PrefillChunk(0, n, start + n, table, slot, source, checkpoint)]
    span = slice(start, start + n)
    return gated_delta_net(qkv[span], b[span], a[span], meta, _spec(w, states))


def _decode(rows, slots: list[int], states, w):
    qkv, b, a = (torch.stack(t) for t in zip(*rows))
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(slots), dtype=torch.int64), block_size=16,
                             num_decode_tokens=len(slots))  # fmt: skip
    meta.decode_state_slots = torch.tensor(slots)
    return gated_delta_net(qkv, b, a, meta, _spec(w, states))


def test_prefill_in_one_chunk_matches_transformers():
    w = _weights()
    qkv, b, a = _inputs(150, seed=1)  # three chunks of the delta rule, the last one partial
    out = _prefill(qkv, b, a, 0, 150, 2, _states(), w)
    torch.testing.assert_close(out, _reference(qkv, b, a, w), atol=1e-4, rtol=1e-4)


def test_prefill_in_pieces_then_decodes_carries_the_states():
    w = _weights()
    qkv, b, a = _inputs(40, seed=2)
    states = _states()
    parts = [_prefill(qkv, b, a, 0, 13, 1, states, w), _prefill(qkv, b, a, 13, 20, 1, states, w)]
    parts += [_decode([(qkv[i], b[i], a[i])], [1], states, w) for i in range(33, 40)]
    torch.testing.assert_close(torch.cat(parts), _reference(qkv, b, a, w), atol=1e-4, rtol=1e-4)


def test_checkpoint_holds_the_states_after_its_tokens():
    w = _weights()
    qkv, b, a = _inputs(50, seed=3)
    states = _states()
    _prefill(qkv, b, a, 0, 45, 0, states, w, checkpoint=(32, 3))  # slot 3 keeps the states after 32 tokens
    resumed = [_prefill(qkv, b, a, 32, 18, 1, states, w, source=3)]  # a prefix hit: slot 1 from the checkpoint
    torch.testing.assert_close(torch.cat(resumed), _reference(qkv, b, a, w)[32:], atol=1e-4, rtol=1e-4)


def test_decode_rows_of_several_sequences_each_read_their_slot():
    w = _weights()
    seqs = [_inputs(12, seed=10 + i) for i in range(3)]
    states = _states()
    for i, (qkv, b, a) in enumerate(seqs):
        _prefill(qkv, b, a, 0, 9, i, states, w)
    outs = [_decode([(s[0][t], s[1][t], s[2][t]) for s in seqs], [0, 1, 2], states, w) for t in range(9, 12)]
    got = torch.stack(outs, dim=1)  # [3 seqs, 3 tokens, Hv * Dv]
    for i, (qkv, b, a) in enumerate(seqs):
        torch.testing.assert_close(got[i], _reference(qkv, b, a, w)[9:], atol=1e-4, rtol=1e-4)


def test_gated_rmsnorm_matches_transformers():
    norm = qwen3_5.Qwen3_5RMSNormGated(DV, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(DV))
    x, z = torch.randn(5, HV * DV), torch.randn(5, HV * DV)
    expected = norm(x.reshape(-1, DV), z.reshape(-1, DV)).reshape(5, -1)
    torch.testing.assert_close(gated_rmsnorm(x, z, norm.weight.detach(), 1e-6), expected)


def test_decode_rows_seeded_from_zeros_or_a_checkpoint():
    """A one-token prompt is a decode row at position 0: its slot (an earlier sequence's) must not be read; a prefix
    hit with one token left decodes from the checkpoint's states."""
    w = _weights()
    qkv, b, a = _inputs(9, seed=4)
    states = _states()
    for t in states:
        t.normal_()  # slots left by earlier sequences
    _prefill(qkv, b, a, 0, 8, 3, states, w)  # slot 3 holds the states after 8 tokens (a checkpoint)
    meta = AttentionMetadata(slot_mapping=torch.zeros(2, dtype=torch.int64), block_size=16, num_decode_tokens=2)
    meta.decode_state_slots = torch.tensor([0, 1])
    meta.decode_state_seeds = [(0, -1), (1, 3)]
    rows = torch.stack([qkv[0], qkv[8]]), torch.stack([b[0], b[8]]), torch.stack([a[0], a[8]])
    out = gated_delta_net(*rows, meta, _spec(w, states))
    reference = _reference(qkv, b, a, w)
    torch.testing.assert_close(out, reference[[0, 8]], atol=1e-4, rtol=1e-4)
