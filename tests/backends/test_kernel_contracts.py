"""Every registered backend's kernel table against the contract declared once in kernel_contracts.py: each entry's
signature (parameter names, kinds and defaults) against its family's protocol, including the parts `attention` is
built from, for the backends this machine cannot run too; and the CPU's kernels, and the torch ops the plug-in
backends run, called with the protocols' shapes: what they return and what they write in place."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest
import torch

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.base import Availability, HardwareBackend
from sagellm.backends.cpu import CpuBackend
from sagellm.backends.kernel_contracts import (
    REQUIRED_OPS,
    KernelTable,
    KvWrite,
    Linear,
    PagedDecodeAttention,
    PrefillAttention,
    RmsNorm,
)
from sagellm.backends.layer_caches import RecurrentStates
from sagellm.backends.layer_specs import AttentionSpec, DeltaNetSpec, MoeSpec
from sagellm.backends.registry import BACKENDS
from sagellm.backends.torch_ops import TorchOpsBackend

FAMILIES: dict[str, type] = typing.get_type_hints(KernelTable)  # op name -> its protocol
ATTENTION_PARTS = {"write": KvWrite, "decode": PagedDecodeAttention, "prefill": PrefillAttention}
EMPTY = inspect.Parameter.empty
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def mismatches(kernel: Any, protocol: type) -> list[str]:
    """How `kernel` cannot be called as `protocol` declares: each positional-or-keyword parameter at its place and
    name, each keyword-only one by name (or taken by **kwargs), a default wherever the contract has one and the same
    value where it gives one (`...`: any), and no parameter of its own without a default."""
    wanted = list(inspect.signature(protocol.__call__).parameters.values())[1:]  # past self
    given = inspect.signature(kernel).parameters
    positional = [p for p in given.values() if p.kind in POSITIONAL]
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in given.values())
    problems = []
    for place, want in enumerate(wanted):
        if want.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            have = positional[place] if place < len(positional) else None
            if have is None or have.name != want.name or have.kind is not want.kind:
                problems.append(f"parameter {place} is {have}, the contract's is {want.name!r} (positional or keyword)")
                continue
        else:
            have = given.get(want.name)
            if have is None and takes_any_keyword:
                continue
            if have is None or have.kind not in BY_NAME:
                problems.append(f"takes no keyword {want.name!r}")
                continue
        if want.default is not EMPTY and have.default is EMPTY:
            problems.append(f"{want.name!r} has no default; the contract's is {want.default!r}")
        elif want.default not in (EMPTY, ...) and have.default != want.default:
            problems.append(f"{want.name!r} defaults to {have.default!r}; the contract's default is {want.default!r}")
    names = {want.name for want in wanted}
    for own in given.values():
        if own.name not in names and own.kind in (*POSITIONAL, inspect.Parameter.KEYWORD_ONLY) and own.default is EMPTY:
            problems.append(f"needs {own.name!r}, which the contract does not pass")
    return problems


def declared_kernels(name: str) -> KernelTable:
    """Backend `name`'s table, built past its availability check: building one touches no device (the CUDA one
    imports triton, which compiles nothing until a kernel runs), so a machine without the hardware still sees what
    each backend declares."""
    cls = BACKENDS.get(name)
    if name == "cuda":
        pytest.importorskip("triton")
    return cls.__new__(cls).kernels()


@pytest.fixture(scope="module", params=BACKENDS.names())
def declared(request) -> tuple[str, KernelTable]:
    return request.param, declared_kernels(request.param)


def test_every_backend_is_checked() -> None:
    assert {"cpu", "cuda", "ascend", "cambricon", "hygon"} <= set(BACKENDS.names())


def test_every_table_holds_each_required_kernel_and_nothing_undeclared(declared: tuple[str, KernelTable]) -> None:
    name, table = declared
    assert set(REQUIRED_OPS) <= set(table), f"{name} lacks {sorted(set(REQUIRED_OPS) - set(table))}"
    assert set(table) <= set(FAMILIES), (
        f"{name} declares kernels no contract names: {sorted(set(table) - set(FAMILIES))}"
    )


def test_every_kernel_takes_its_family_signature(declared: tuple[str, KernelTable]) -> None:
    name, table = declared
    problems = {op: found for op, kernel in table.items() if (found := mismatches(kernel, FAMILIES[op]))}
    assert not problems, f"{name}'s kernels differ from kernel_contracts.py: {problems}"


def test_the_parts_attention_is_built_from_take_their_signatures(declared: tuple[str, KernelTable]) -> None:
    """The decode, write and prefill parts the torch attention calls, as each backend bound them."""
    name, table = declared
    parts = inspect.signature(table["attention"]).parameters
    assert set(ATTENTION_PARTS) <= set(parts), f"{name}'s attention is not built from the swappable parts"
    problems = {
        part: found
        for part, protocol in ATTENTION_PARTS.items()
        if (found := mismatches(parts[part].default, protocol))
    }
    assert not problems, f"{name}'s attention parts differ from kernel_contracts.py: {problems}"


def test_a_drifting_kernel_is_caught() -> None:
    def good(x, weight, eps): ...
    def renamed(x, w, eps): ...
    def keyword_only(x, weight, *, eps): ...
    def needs_more(x, weight, eps, scale): ...
    def takes_more(x, weight, eps, scale=1.0): ...

    def decode(q, cache, block_tables, context_lens, spec): ...
    def buffers_first(q, cache, block_tables, context_lens, buffers=None, spec=None): ...
    def restated(q, cache, block_tables, context_lens, scale, window=0, softcap=0.0, sinks=None): ...
    def linear(x, weight, bias=None): ...
    def other_default(x, weight, bias=0.0): ...
    def no_default(x, weight, bias): ...

    assert mismatches(good, RmsNorm) == [] and mismatches(takes_more, RmsNorm) == []
    assert mismatches(decode, PagedDecodeAttention) == [] and mismatches(linear, Linear) == []
    for drifted, protocol, says in [
        (renamed, RmsNorm, "parameter 1"),
        (keyword_only, RmsNorm, "parameter 2"),
        (needs_more, RmsNorm, "needs 'scale'"),
        (buffers_first, PagedDecodeAttention, "parameter 4"),
        (restated, PagedDecodeAttention, "parameter 4"),  # the layer's settings one by one, not its AttentionSpec
        (other_default, Linear, "defaults to 0.0"),
        (no_default, Linear, "'bias' has no default"),
    ]:
        assert any(says in problem for problem in mismatches(drifted, protocol)), drifted.__name__


# -- the kernels run with the contract's shapes --------------------------------------------------------------------

T, H, HQ, HK, D, INTER, V = 5, 32, 4, 2, 16, 24, 50  # tokens, hidden, query / kv heads, head dim, intermediate, vocab


class TorchOpsOnCpu(TorchOpsBackend):
    """The torch ops table the Ascend, Cambricon and Hygon backends run on their devices, here on the CPU."""

    name = "torch-ops-on-cpu"
    device_type = "cpu"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, "the CPU")


@pytest.fixture(scope="module", params=[CpuBackend, TorchOpsOnCpu], ids=["cpu", "torch-ops"])
def runnable(request) -> tuple[HardwareBackend, KernelTable]:
    backend = request.param()
    return backend, backend.kernels()


def tensors_in(values: Any) -> list[torch.Tensor]:
    """The tensors among `values`, and among the fields of those that are dataclasses (a layer's spec) or tuples (its
    cache or states)."""
    found = []
    for value in values:
        if dataclasses.is_dataclass(value):
            found += tensors_in(getattr(value, f.name) for f in dataclasses.fields(value))
        elif isinstance(value, tuple):
            found += tensors_in(value)
        elif isinstance(value, torch.Tensor):
            found.append(value)
    return found


def call(kernel: Any, *args: Any, writes: tuple[torch.Tensor, ...] = (), **kwargs: Any) -> Any:
    """kernel(*args, **kwargs), checking it left every tensor argument (a spec's too) but those it `writes` as it
    was."""
    inputs = [a for a in tensors_in((*args, *kwargs.values())) if all(a is not w for w in writes)]
    before = [a.clone() for a in inputs]
    out = kernel(*args, **kwargs)
    for tensor, copy in zip(inputs, before):
        assert torch.equal(tensor, copy), "a kernel changed an input its contract does not let it write"
    return out


def fused_heads(tokens: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, HQ, D] and k [T, HK, D] as strided views of a fused qkv projection's output."""
    qkv = torch.randn(tokens, (HQ + 2 * HK) * D)
    return qkv[:, : HQ * D].view(tokens, HQ, D), qkv[:, HQ * D : (HQ + HK) * D].view(tokens, HK, D)


def expect(out: Any, *shape: int, dtype: torch.dtype = torch.float32) -> None:
    assert isinstance(out, torch.Tensor) and out.shape == shape and out.dtype == dtype, (out.shape, out.dtype)


def test_token_kernels_keep_to_their_shapes(runnable: tuple[HardwareBackend, KernelTable]) -> None:
    backend, ops = runnable
    expect(call(ops["embedding"], torch.tensor([3, 0, 49, 3, 7]), torch.randn(V, H)), T, H)
    x, residual, weight = torch.randn(T, H), torch.randn(T, H), torch.rand(H) + 0.5
    expect(call(ops["rmsnorm"], x, weight, 1e-6), T, H)
    normed, summed = call(ops["add_rmsnorm"], x, residual, weight, 1e-6)
    expect(normed, T, H)
    assert torch.allclose(summed, x + residual)
    q, _ = fused_heads()
    expect(call(ops["head_rmsnorm"], q, torch.rand(D) + 0.5, 1e-6), T, HQ, D)
    z = torch.randn(T, HQ * D)
    expect(call(ops["gated_rmsnorm"], z.flip(0), z, torch.rand(D) + 0.5, 1e-6), T, HQ * D)
    packed, bias = backend.prepare_linear_weight(torch.randn(INTER, H)), torch.randn(INTER)
    expect(call(ops["linear"], x, packed, bias), T, INTER)
    expect(call(ops["linear"], x, packed), T, INTER)
    gate_up = torch.randn(T, 2 * INTER)
    expect(call(ops["silu_mul"], gate_up), T, INTER)
    expect(call(ops["gelu_tanh_mul"], gate_up), T, INTER)
    expect(call(ops["sigmoid"], z), T, HQ * D)
    assert torch.allclose(call(ops["add"], x, residual), x + residual)


@pytest.mark.parametrize("rotary", [D, D // 2], ids=["whole-head", "partial"])
def test_rope_turns_the_first_rotary_dims_of_each_head(runnable: tuple[HardwareBackend, KernelTable], rotary) -> None:
    _, ops = runnable
    q, k = fused_heads()
    q_out, k_out = call(ops["rope"], q, k, torch.tensor([0, 1, 5, 9, 30]), torch.randn(32, rotary))
    expect(q_out, T, HQ, D)
    expect(k_out, T, HK, D)
    assert torch.equal(q_out[..., rotary:], q[..., rotary:]) and torch.equal(k_out[..., rotary:], k[..., rotary:])
    assert not torch.allclose(q_out[1:, :, :rotary], q[1:, :, :rotary]), "position 0 alone is not turned"


def test_moe_returns_the_hidden_shape(runnable: tuple[HardwareBackend, KernelTable]) -> None:
    _, ops = runnable
    experts, held = 4, 2  # experts 1 and 2 held here, of 4
    gate_up, down = torch.randn(held, 2 * INTER, H), torch.randn(held, H, INTER)
    spec = MoeSpec(torch.randn(experts, H), gate_up, down, top_k=2, first_expert=1)
    out = call(ops["moe"], torch.randn(T, H), spec, linear=ops["linear"])
    expect(out, T, H)


def test_attention_writes_the_cache_then_attends(
    runnable: tuple[HardwareBackend, KernelTable], paged_sequences
) -> None:
    _, ops = runnable
    seqs = paged_sequences(HQ, HK, D)
    seqs.step([], [("a", 4), ("b", 19)])
    q, k, v, meta, _ = seqs.step(["a", "b"], [("c", 3)])  # two decode rows, then a prefill chunk
    expect(call(ops["attention"], q, k, v, seqs.cache, meta, AttentionSpec(D**-0.5), writes=seqs.cache), T, HQ, D)
    assert torch.equal(seqs.cache.k.flatten(0, 1)[meta.slot_mapping], k)
    assert torch.equal(seqs.cache.v.flatten(0, 1)[meta.slot_mapping], v)
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    spec = AttentionSpec(D**-0.5, window=3, softcap=5.0, sinks=torch.randn(HQ))
    expect(call(ops["paged_decode_attention"], q[:2], seqs.cache, tables, lens, spec), 2, HQ, D)


def test_gated_delta_net_updates_only_its_sequences_state_slots(runnable: tuple[HardwareBackend, KernelTable]) -> None:
    _, ops = runnable
    hk, dk, hv, dv, width, slots = 2, 8, 4, 8, 4, 5
    channels = 2 * hk * dk + hv * dv
    meta = AttentionMetadata(torch.zeros(T, dtype=torch.int64), 16, num_decode_tokens=2)
    meta.decode_state_slots = torch.tensor([0, 2])
    meta.prefills = [PrefillChunk(2, 3, 3, torch.zeros(1, dtype=torch.int32), state_slot=3)]  # from zero states
    states = RecurrentStates(torch.randn(slots, channels, width - 1), torch.randn(slots, hv, dk, dv))
    before = [state.clone() for state in states]
    weights = torch.randn(channels, width), torch.rand(hv).add(0.1).log(), torch.randn(hv)
    spec = DeltaNetSpec(states, *weights, hk, dk, dv)
    args = (torch.randn(T, channels), torch.randn(T, hv), torch.randn(T, hv), meta, spec)
    expect(call(ops["gated_delta_net"], *args, writes=states), T, hv * dv)
    for state, old in zip(states, before):
        assert [not torch.equal(state[s], old[s]) for s in range(slots)] == [True, False, True, True, False]


def test_add_lora_adds_into_out_in_place(runnable: tuple[HardwareBackend, KernelTable]) -> None:
    _, ops = runnable
    slots, rank, k, n = 3, 4, H, INTER
    out, x = torch.randn(T, n), torch.randn(T, k)
    before = out.clone()
    row_slots = torch.tensor([0, -1, 2, 2, -1])
    lora_a, lora_b = torch.randn(slots, rank, k), torch.randn(slots, rank, n).transpose(1, 2)  # [S, N, R], as held
    assert call(ops["add_lora"], out, x, row_slots, lora_a, lora_b, writes=(out,)) is out
    slot_of = row_slots.tolist()
    updates = [x[t] @ lora_a[s].T @ lora_b[s].T if s >= 0 else torch.zeros(n) for t, s in enumerate(slot_of)]
    assert torch.allclose(out, before + torch.stack(updates), rtol=1e-4, atol=1e-4)
