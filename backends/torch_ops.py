"""The torch implementation of every op in the kernel table, written once for any device torch runs on.

The CPU backend runs these directly (with its own `linear`), the accelerator plug-in backends (Ascend, Cambricon,
Hygon) run them on their device, and the CUDA backend swaps in triton kernels for the per-token ops and the decode
half of attention while reusing the prefill half from here. It also holds `TorchOpsBackend`, the one base class for
"these ops on torch device X", so a new torch device is a class with a name, a device type and an availability check.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.base import Availability, HardwareBackend, KernelTable


class DecodeAttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor: ...


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)  # [T, H]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)  # [T, H]


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual  # [T, H]
    return rmsnorm(summed, weight, eps), summed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reads the default packing of `HardwareBackend.prepare_linear_weight`: the [out, in] weight as given."""
    return F.linear(x, weight, bias)  # [T, N]


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding into new tensors; q and k may be strided views of a fused qkv output.

    When k's heads directly follow q's in memory (the fused qkv output), both are rotated in one pass over a joint
    [T, Hq + Hk, D] view: half the ops, which is what a one-token decode step pays for (measured ~2x per layer)."""
    half = cos_sin.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)  # [T, D]
    cos = cs[:, None, :half]  # [T, 1, D/2]
    sin = cs[:, None, half:]  # [T, 1, D/2]
    joint = _joint_heads(q, k)
    if joint is not None:
        return _rotate(joint, cos, sin, half).split([q.shape[1], k.shape[1]], dim=1)
    return _rotate(q, cos, sin, half), _rotate(k, cos, sin, half)


def _joint_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, Hq, D] and k [T, Hk, D] as one [T, Hq + Hk, D] view when k's heads follow q's in every row."""
    d = q.shape[2]
    heads_packed = q.stride()[1:] == (d, 1) and k.stride()[1:] == (d, 1) and q.dtype == k.dtype
    if not heads_packed or (q.shape[0] > 1 and q.stride(0) != k.stride(0)):  # a row's stride is moot for one row
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * d * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], d), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    x1, x2 = x[..., :half], x[..., half:]  # [T, H, D/2] each
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [T, H, D]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)  # x2 cos + x1 sin
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[:, :half]).mul_(x[:, half:])  # [T, I]


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def moe(
    x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int, first_expert: int
) -> torch.Tensor:
    """Mixtral's sparse MLP, computed by the experts `gate_up` and `down` hold: numbers first_expert.. of the E the
    router [E, H] scores (all of them, or one expert parallel rank's share).

    Each token is routed over all E experts (softmax, top_k, the chosen weights renormalized to sum to 1, in fp32 as
    transformers does); the (token, choice) pairs are then sorted by expert so each held expert runs once, one matmul
    over the tokens that chose it, and its weighted output is added to theirs. Pairs routed to experts held elsewhere
    add nothing here, so the ranks' outputs sum to the whole layer's."""
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)  # [T, E]
    weights, chosen = torch.topk(probs, top_k, dim=-1)  # [T, K]
    weights = (weights / weights.sum(dim=-1, keepdim=True)).flatten()  # [T * K], fp32
    held = gate_up.shape[0]
    local = chosen.flatten() - first_expert  # [T * K]: 0..held-1 for experts held here
    order = local.argsort(stable=True)  # pairs grouped by expert, those held elsewhere below 0 first
    counts = torch.bincount(local.clamp(-1, held) + 1, minlength=held + 2).tolist()  # [below, expert 0.., above]
    out = torch.zeros_like(x)  # [T, H]
    start = counts[0]
    for expert, count in enumerate(counts[1:-1]):
        if count == 0:
            continue
        pairs = order[start : start + count]  # [n]
        start += count
        tokens = pairs // top_k  # [n]
        hidden = silu_mul(F.linear(x.index_select(0, tokens), gate_up[expert]))  # [n, I]
        contribution = F.linear(hidden, down[expert]) * weights[pairs, None]  # [n, H]
        out.index_add_(0, tokens, contribution.to(x.dtype))
    return out


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores each new token's K/V at its flat slot (block * block_size + offset) of the paged caches."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)  # [num_blocks * block_size, Hk, D]
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


DECODE_KV_HEADROOM = 256  # tokens of growth a decode batch's kept K/V has room for before it is gathered again


class GatherBuffers:
    """Memory the torch attention path reuses across layers and steps, owned by one kernel table.

    Decode keeps each layer's gathered K/V of the current decode batch (`decode_kv`) and, while the batch continues,
    only copies in each row's new token; prefill chunks with earlier context gather into one reused buffer (`gather`).
    Reusing memory instead of fresh multi-megabyte tensors saves the allocation and, on the CPU, the page faults of
    touching new memory (measured ~1 ms of ~4 ms for 16 sequences x 384 tokens). Attention outputs never alias it."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        # Decode K/V as gathered last step, per (k|v, cache): [B, capacity, Hk, D], zero beyond what was written.
        self._decode_kv: dict[tuple[str, int], torch.Tensor] = {}
        self.decode_continues = False  # set by `attention` from AttentionMetadata.decode_continues, per call
        self._mask = _PerStep()
        self._new_tokens = _PerStep()

    def visibility(self, context_lens: torch.Tensor, length: int) -> torch.Tensor | None:
        """The decode mask, built once per step: every layer of a step passes the same `context_lens` tensor."""

        def build() -> torch.Tensor | None:
            if len(context_lens) > 1 or int(context_lens[0]) != length:
                return _visibility(context_lens, length, None)
            return None

        return self._mask.get((context_lens,), length, build)

    def decode_kv(
        self, name: str, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
    ) -> torch.Tensor:
        """The decode rows' cached K (or V) as [B, L, Hk, D], L = the table's width in tokens.

        When the rows are the same sequences as last step, each one token further (`decode_continues`), only the
        new token of each row is copied in: O(batch) instead of re-gathering O(batch x context) every step."""
        batch, width = block_tables.shape
        block_size = cache.shape[1]
        length = width * block_size
        key = (name, cache.data_ptr())
        kept = self._decode_kv.get(key)
        if kept is None or kept.shape[0] != batch or kept.shape[1] < length:
            # Zeroed once: padding must be finite (masked NaN still poisons softmax), and every later write into
            # this buffer comes from the cache, so stale rows beyond a context stay finite too.
            capacity = length + DECODE_KV_HEADROOM
            kept = torch.zeros((batch, capacity, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
            self._decode_kv[key] = kept
        elif self.decode_continues:
            rows, position, slot = self._new_token_index(block_tables, context_lens, block_size)
            kept[rows, position] = cache.flatten(0, 1).index_select(0, slot)
            return kept[:, :length]
        kept[:, :length] = cache.index_select(0, block_tables.reshape(-1)).view(batch, length, *cache.shape[2:])
        return kept[:, :length]

    def _new_token_index(
        self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, flat cache slot) of the token each decode row wrote this step; computed once per step
        (every layer's K and V pass the same tensors), not 2 x layers times."""

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            position = context_lens.long() - 1  # [B]
            block = block_tables.gather(1, (position // block_size)[:, None]).squeeze(1).long()  # [B]
            rows = torch.arange(len(position), device=position.device)
            return rows, position, block * block_size + position % block_size

        return self._new_tokens.get((block_tables, context_lens), block_size, build)

    def gather(self, name: str, cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        index = block_table.reshape(-1)
        n = index.numel()
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.shape[0] < n
            or buffer.shape[1:] != cache.shape[1:]
            or (buffer.dtype, buffer.device) != (cache.dtype, cache.device)
        ):
            buffer = torch.empty((n, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
            self._buffers[name] = buffer
        return torch.index_select(cache, 0, index, out=buffer[:n])  # [n, bs, Hk, D]


class _PerStep:
    """One value derived from a step's metadata tensors, kept while the next call passes the very same tensors: all
    layers of a step do. Tensors are matched by identity; holding them keeps their ids from being reused by a later
    step's tensors while the value is live."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._owners: tuple[torch.Tensor, ...] = ()
        self._value: Any = None

    def get(self, tensors: tuple[torch.Tensor, ...], extra: Any, build: Callable[[], Any]) -> Any:
        key = (*map(id, tensors), extra)
        if self._key != key:
            self._key, self._owners, self._value = key, tensors, build()
        return self._value


def _gather(cache: torch.Tensor, block_table: torch.Tensor, buffers: GatherBuffers | None, name: str) -> torch.Tensor:
    """The cached tokens of the given blocks, in order: [num_blocks, bs, Hk, D] -> [len(block_table) * bs, Hk, D]."""
    blocks = (
        cache.index_select(0, block_table.reshape(-1)) if buffers is None else buffers.gather(name, cache, block_table)
    )
    return blocks.flatten(0, 1)


def _visibility(context_lens: torch.Tensor, length: int, buffers: GatherBuffers | None) -> torch.Tensor | None:
    """Which of the `length` gathered positions each sequence may see, or None when none is padding."""
    if buffers is not None:
        return buffers.visibility(context_lens, length)
    return (torch.arange(length, device=context_lens.device) < context_lens[:, None]).view(len(context_lens), 1, 1, -1)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    buffers: GatherBuffers | None = None,
) -> torch.Tensor:
    """One query token per sequence against its whole cached context, all sequences in one batched call.

    Each sequence's K/V is gathered into a [B, L, Hk, D] tensor padded to the longest context, and the G query heads
    sharing a kv head attend as G rows of one [B, Hk, G, D] query, so GQA needs no repeated K/V. Padded positions are
    masked out, so the caches must hold finite values there (allocate them zeroed)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    # The table's width bounds the context (the runner sends exactly the blocks the longest context needs), so no
    # per-layer reduction over context_lens, and no host-device sync, is needed to size the gather.
    if buffers is None:
        keys = _gather(k_cache, block_tables, None, "k").unflatten(0, (batch, -1))  # [B, L, Hk, D]
        values = _gather(v_cache, block_tables, None, "v").unflatten(0, (batch, -1))
    else:
        keys = buffers.decode_kv("k", k_cache, block_tables, context_lens)  # [B, L, Hk, D]
        values = buffers.decode_kv("v", v_cache, block_tables, context_lens)
    visible = _visibility(context_lens, keys.shape[1], buffers)  # [B, 1, 1, L] or None
    out = F.scaled_dot_product_attention(
        q.unflatten(1, (num_kv_heads, num_q_heads // num_kv_heads)),  # [B, Hk, G, D]
        keys.transpose(1, 2),  # [B, Hk, L, D]
        values.transpose(1, 2),
        attn_mask=visible,
        scale=scale,
    )  # [B, Hk, G, D]
    return out.flatten(1, 2)  # [B, Hq, D]


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
    buffers: GatherBuffers | None = None,
) -> torch.Tensor:
    """Causal attention of one chunk's queries [n, Hq, D] over its sequence; k, v are the chunk's fresh [n, Hk, D].

    A chunk that starts the sequence attends to its fresh K/V directly; a later chunk reads its earlier context from
    the cache (which already holds this chunk too), and query i sees keys up to position context_len - n + i. Inputs
    are 4-D with K/V broadcast over each group's query heads: that keeps torch on its fused (flash) CPU kernel, which
    3-D inputs or `enable_gqa` would drop for the unfused math path (3-4x slower at 256-1024 tokens)."""
    n, ctx = chunk.query_len, chunk.context_len
    if ctx == n:
        keys, values, mask, causal = k, v, None, True
    else:
        block_size = k_cache.shape[1]
        table = chunk.block_table[: -(-ctx // block_size)]
        keys = _gather(k_cache, table, buffers, "k")[:ctx]  # [ctx, Hk, D]
        values = _gather(v_cache, table, buffers, "v")[:ctx]
        rows = torch.arange(n, device=q.device)[:, None] + (ctx - n)  # [n, 1]
        mask = torch.arange(ctx, device=q.device)[None, :] <= rows  # [n, ctx]
        causal = False
    num_kv_heads, group = keys.shape[1], q.shape[1] // keys.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unflatten(0, (num_kv_heads, group)),  # [Hk, G, n, D]
        keys.transpose(0, 1)[:, None].expand(-1, group, -1, -1),  # [Hk, G, ctx, D], stride 0 over G: no copy
        values.transpose(0, 1)[:, None].expand(-1, group, -1, -1),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
    )  # [Hk, G, n, D]
    return out.flatten(0, 1).transpose(0, 1)  # [n, Hq, D]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode: DecodeAttentionFn = paged_decode_attention,
    buffers: GatherBuffers | None = None,
    write: Callable[..., None] = write_kv,
    prefill: Callable[..., torch.Tensor] = prefill_attention,
) -> torch.Tensor:
    """Writes the batch's K/V into the caches, then attends: the decode tokens in one `decode` call, each prefill
    chunk in one `prefill` call (`prefill_attention`'s arguments). `decode`, `write` and `prefill` are the parts a
    device swaps (the CUDA backend passes its triton decode kernel, the CPU its native ones); `buffers` serve the
    prefill gathers (bind the same ones into `decode` to share them)."""
    write(k, v, k_cache, v_cache, meta.slot_mapping)
    nd = meta.num_decode_tokens
    decoded = None
    if nd:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        if buffers is not None:
            buffers.decode_continues = meta.decode_continues
        decoded = decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
        if nd == q.shape[0]:  # a decode-only step, the steady state: no staging copy
            return decoded
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if decoded is not None:
        out[:nd] = decoded
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        out[rows] = prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale, buffers)
    return out


TORCH_KERNELS: KernelTable = {
    "embedding": embedding,
    "rmsnorm": rmsnorm,
    "add_rmsnorm": add_rmsnorm,
    "linear": linear,
    "rope": rope,
    "silu_mul": silu_mul,
    "add": add,
    "moe": moe,
    "attention": attention,
    "paged_decode_attention": paged_decode_attention,
}


class TorchOpsBackend(HardwareBackend):
    """The torch ops of this module on one torch device type; subclasses name the device and say if it is present."""

    device_type: ClassVar[str]

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def select_device(self, index: int) -> None:
        if self.device_type == "cpu":
            super().select_device(index)
        getattr(torch, self.device_type).set_device(index)

    def kernels(self) -> KernelTable:
        """The module's ops, with attention bound to gather buffers of this table's own."""
        buffers = GatherBuffers()
        decode = functools.partial(paged_decode_attention, buffers=buffers)
        attend = functools.partial(attention, decode=decode, buffers=buffers)
        return {**TORCH_KERNELS, "paged_decode_attention": decode, "attention": attend}


def plugin_availability(module: str, stack: str, device_type: str) -> Availability:
    """Whether the out-of-tree torch device plug-in `module` (which adds `torch.<device_type>`) is installed, imports
    and sees a device; imports it only if it is installed, and reports a failed import instead of raising."""
    if importlib.util.find_spec(module) is None:
        return Availability(False, f"needs {module} ({stack}) — not installed")
    try:
        importlib.import_module(module)
    except Exception as exc:  # vendor plug-ins fail on a driver/toolkit mismatch at import time
        return Availability(False, f"needs a working {module} ({stack}) — import failed: {exc}")
    device_module = getattr(torch, device_type, None)
    if device_module is None or not device_module.is_available():
        return Availability(False, f"needs a {stack} device — {module} is installed but sees none")
    return Availability(True, f"torch {torch.__version__}, {module}, {device_module.device_count()} device(s)")
