"""The native Gated DeltaNet (delta_rule.c) against the torch op that defines it (linear_attention.py, itself checked
against transformers in test_gated_delta_net.py): outputs and both states of every slot, for a toy shape whose head
sizes are no multiple of a vector and for Qwen3.5-0.8B's, on one thread and two, on every instruction-set variant
this CPU runs. Decode rows agree to fp32 rounding (the same recurrence); sequences of several tokens to the torch
prefill's chunked form within test_gated_delta_net's tolerance. Then the CPU backend's dispatch of whole batches."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.cpu import NativeDispatch
from sagellm.backends.layer_caches import RecurrentStates
from sagellm.backends.layer_specs import DeltaNetSpec
from sagellm.backends.native import NativeKernels
from sagellm.backends.native.tensor_fits import fits_delta_rule
from sagellm.backends.torch_ops.linear_attention import gated_delta_net

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)

SHAPES = [(2, 8, 4, 6), (16, 128, 16, 128)]  # (Hk, Dk, Hv, Dv): a toy's, Qwen3.5-0.8B's linear layers'
K = 4  # the convolution's width
SLOTS = 9


class Layer:
    """One Gated DeltaNet layer's weights and mid-sequence states (random, as after some tokens) in SLOTS slots."""

    def __init__(self, hk: int, dk: int, hv: int, dv: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dims = (hk, dk, dv)
        self.channels, self.hv = 2 * hk * dk + hv * dv, hv
        self.conv_states = torch.randn(SLOTS, self.channels, K - 1, generator=g)
        self.ssm_states = torch.randn(SLOTS, hv, dk, dv, generator=g) * 0.1
        self.conv_weight = torch.randn(self.channels, K, generator=g) * 0.5
        self.a_log = torch.rand(hv, generator=g).add(0.1).log()
        self.dt_bias = torch.randn(hv, generator=g)
        states = RecurrentStates(self.conv_states, self.ssm_states)
        self.spec = DeltaNetSpec(states, self.conv_weight, self.a_log, self.dt_bias, *self.dims)
        self.gen = g

    def inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mixed_qkv [n, C], b and a [n, Hv]."""
        g = self.gen
        return (torch.randn(n, self.channels, generator=g), torch.randn(n, self.hv, generator=g),
                torch.randn(n, self.hv, generator=g))  # fmt: skip

    def spec_with(self, states: RecurrentStates) -> DeltaNetSpec:
        """The layer's spec over these states (copies of the layer's)."""
        return replace(self.spec, states=states)

    def copies(self) -> RecurrentStates:
        return RecurrentStates(self.conv_states.clone(), self.ssm_states.clone())


def decode_meta(slots: list[int], prefills: list[PrefillChunk] = ()) -> AttentionMetadata:
    n = len(slots) + sum(chunk.query_len for chunk in prefills)
    meta = AttentionMetadata(slot_mapping=torch.zeros(n, dtype=torch.int64), block_size=16,
                             num_decode_tokens=len(slots), prefills=list(prefills))  # fmt: skip
    meta.decode_state_slots = torch.tensor(slots, dtype=torch.int64)
    return meta


def assert_same(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance / 10)


def assert_states(states: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], tolerance: float = 1e-5):
    for got, want in zip(states, expected):
        assert_same(got, want, tolerance)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_matches_the_torch_op(native: NativeKernels, shape: tuple[int, int, int, int], threads: int) -> None:
    layer = Layer(*shape)
    slots = [7, 2, 5, 0]  # scattered; slots 1, 3, 4, 6, 8 must stay as they are
    qkv, b, a = layer.inputs(len(slots))
    expected_states, states = layer.copies(), layer.copies()
    expected = gated_delta_net(qkv, b, a, decode_meta(slots), layer.spec_with(expected_states))
    starts = torch.arange(len(slots) + 1)
    assert_same(
        native.gated_delta_net(qkv, b, a, starts, torch.tensor(slots), layer.spec_with(states), threads), expected
    )
    assert_states(states, expected_states)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 2])
def test_sequences_match_the_torch_prefill(native: NativeKernels, shape: tuple[int, int, int, int], threads: int):
    """Three sequences of 5, 1 and 70 tokens in one call, each continuing its slot."""
    layer, lengths, slots = Layer(*shape), [5, 1, 70], [4, 8, 1]
    qkv, b, a = layer.inputs(sum(lengths))
    starts = torch.tensor([0, 5, 6, 76])
    table = torch.zeros(1, dtype=torch.int32)
    chunks = [PrefillChunk(int(first), n, n + 10, table, slot, slot) for first, n, slot in zip(starts, lengths, slots)]
    expected_states, states = layer.copies(), layer.copies()
    expected = gated_delta_net(qkv, b, a, decode_meta([], chunks), layer.spec_with(expected_states))
    out = native.gated_delta_net(qkv, b, a, starts, torch.tensor(slots), layer.spec_with(states), threads)
    assert_same(out, expected, 1e-4)
    assert_states(states, expected_states, 1e-4)


def test_inputs_may_be_rows_of_a_wider_projection(native: NativeKernels) -> None:
    """mixed_qkv, b and a as column views of one fused projection's output, rows a stride apart."""
    layer = Layer(*SHAPES[0])
    qkv, b, a = layer.inputs(3)
    fused = torch.cat([qkv, b, a, torch.randn(3, 5)], dim=1)
    c, hv = layer.channels, layer.hv
    views = fused[:, :c], fused[:, c : c + hv], fused[:, c + hv : c + 2 * hv]
    expected_states, states = layer.copies(), layer.copies()
    expected = gated_delta_net(qkv, b, a, decode_meta([4, 1, 8]), layer.spec_with(expected_states))
    slots = torch.tensor([4, 1, 8])
    assert_same(native.gated_delta_net(*views, torch.arange(4), slots, layer.spec_with(states)), expected)
    assert_states(states, expected_states)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dispatch_runs_the_batch_natively(
    native: NativeKernels, shape: tuple[int, int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of two decodes (one seeded from a prefix checkpoint) and three prefill chunks: one from zero states,
    one from a prefix checkpoint's slot taking a checkpoint of its own, one continuing its slot; then a decode-only
    step (one row seeded with zeros). The CPU backend's op equals the torch op's, every slot's states included, and
    ran natively: one call for the decodes, one per chunk and piece."""
    layer, dispatch = Layer(*shape), NativeDispatch(native)
    calls, kernel = [], native.gated_delta_net
    monkeypatch.setattr(native, "gated_delta_net", lambda *args: calls.append(len(args[0])) or kernel(*args))
    table = torch.zeros(1, dtype=torch.int32)
    chunks = [
        PrefillChunk(2, 70, 70, table, state_slot=3),
        PrefillChunk(72, 5, 40, table, state_slot=6, source_slot=4, checkpoint=(2, 1)),
        PrefillChunk(77, 9, 30, table, state_slot=7, source_slot=7),
    ]
    mixed, decodes = decode_meta([0, 8], chunks), decode_meta([3, 6, 0])
    mixed.decode_state_seeds, decodes.decode_state_seeds = [(8, 2)], [(0, -1)]
    expected_states, states = layer.copies(), layer.copies()
    for meta in (mixed, decodes):
        qkv, b, a = layer.inputs(meta.num_tokens)
        expected = gated_delta_net(qkv, b, a, meta, layer.spec_with(expected_states))
        assert_same(dispatch.gated_delta_net(qkv, b, a, meta, layer.spec_with(states)), expected, 1e-4)
        assert_states(states, expected_states, 1e-4)
    assert calls == [2, 70, 2, 3, 9, 3]


def test_fits_fp32_heads_up_to_256_and_convolutions_up_to_8() -> None:
    layer = Layer(*SHAPES[0])
    qkv, b, a = layer.inputs(2)
    spec = layer.spec
    assert fits_delta_rule(qkv, b, a, replace(spec, head_k_dim=256, head_v_dim=256))
    assert not fits_delta_rule(qkv, b, a, replace(spec, head_k_dim=8, head_v_dim=257))
    assert fits_delta_rule(qkv, b, a, spec) and not fits_delta_rule(qkv.double(), b, a, spec)
    assert not fits_delta_rule(qkv, b, a, replace(spec, conv_weight=torch.zeros(layer.channels, 9)))
    assert not fits_delta_rule(qkv, b, a, layer.spec_with(RecurrentStates(spec.states.conv.double(), spec.states.ssm)))


def test_tiled_value_heads_are_the_grouped_op_in_the_files_order(native: NativeKernels) -> None:
    """A GGUF's value heads tiled by key head (value head h reads key head h % Hk): the torch op with
    `tiled_value_heads` on the tiled inputs equals the grouped op (h reads h // (Hv / Hk), transformers' order) on
    the same heads grouped, its outputs and states tiled back; the native op on decode rows equals it."""
    hk, dk, hv, dv = 2, 8, 6, 8
    layer = Layer(hk, dk, hv, dv, seed=3)
    tiled = torch.arange(hv).view(hk, hv // hk).T.reshape(-1)  # tiled position j holds grouped head tiled[j]
    channels = torch.cat([torch.arange(2 * hk * dk), 2 * hk * dk + (tiled[:, None] * dv + torch.arange(dv)).flatten()])
    slots, lengths = [7, 2], [1, 1]
    qkv, b, a = layer.inputs(sum(lengths))
    grouped_states = layer.copies()
    grouped = gated_delta_net(qkv, b, a, decode_meta(slots), layer.spec_with(grouped_states))
    as_tiled = lambda states: RecurrentStates(states.conv[:, channels], states.ssm[:, tiled])  # noqa: E731
    weights = (layer.conv_weight[channels], layer.a_log[tiled], layer.dt_bias[tiled])
    spec = DeltaNetSpec(layer.spec.states, *weights, *layer.dims, tiled_value_heads=True)
    for run in ("torch", "native"):
        states = RecurrentStates(*(s.clone() for s in as_tiled(layer.copies())))
        inputs = (qkv[:, channels], b[:, tiled], a[:, tiled])
        if run == "torch":
            out = gated_delta_net(*inputs, decode_meta(slots), replace(spec, states=states))
        else:
            starts, picked = torch.arange(len(slots) + 1), torch.tensor(slots)
            out = native.gated_delta_net(*inputs, starts, picked, replace(spec, states=states), 1)
        assert_same(out, grouped.view(-1, hv, dv)[:, tiled].flatten(1))
        assert_states(states, as_tiled(grouped_states))
    untiled = gated_delta_net(qkv[:, channels], b[:, tiled], a[:, tiled], decode_meta(slots),
                              replace(spec, states=as_tiled(layer.copies()), tiled_value_heads=False))  # fmt: skip
    assert not torch.allclose(untiled, grouped.view(-1, hv, dv)[:, tiled].flatten(1), atol=1e-3), "the flag acts"
