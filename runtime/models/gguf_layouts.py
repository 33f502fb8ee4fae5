"""llama.cpp's rearrangements of Hugging Face tensors, undone at load so a GGUF's weights equal the checkpoint's.

Two are reorders of rows (so they apply to a weight kept as its quantized blocks as well as to its floats): the
rotary pairs of llama-arch q/k rows, and Qwen3.5's value heads, which its converter stores tiled by key head
([K0, K1, ..., K0, K1, ...] where Hugging Face groups them: [K0's, K1's, ...]) when there are more value heads than
key heads. The value heads' order also runs along out_proj's columns (undone on floats only) and through its
per-head vectors. Two change values: Qwen3.5's A_log is stored as -exp(A_log), and its convolution squeezed to
[C, K]."""

from __future__ import annotations

import numpy as np

from sagellm.runtime.models.architectures import BY_NAME
from sagellm.runtime.models.config import ModelConfig

# A linear attention layer's tensors whose rows run over value heads: a head's Dv channels each (after q's and k's in
# the fused projection and the convolution), or one number per head.
_AFTER_QK = ("in_proj_qkv.weight", "conv1d.weight")
_CHANNELS = (*_AFTER_QK, "in_proj_z.weight")
_VALUE_HEAD_ROWS = (*_CHANNELS, "in_proj_b.weight", "in_proj_a.weight", "A_log", "dt_bias")


def row_order(config: ModelConfig, hf_name: str) -> np.ndarray | None:
    """Where each of the Hugging Face tensor's rows lies in the GGUF's (`hf = gguf[order]`), None when in place."""
    arch = BY_NAME[config.architecture]
    if arch.gguf_qk_permuted and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_heads if hf_name.endswith("q_proj.weight") else config.num_kv_heads
        rows = heads * config.head_dim
        return np.arange(rows).reshape(heads, config.head_dim // 2, 2).swapaxes(1, 2).reshape(rows)
    role = hf_name.rpartition("linear_attn.")[2]
    if not _tiled_value_heads(config) or ".linear_attn." not in hf_name or role not in _VALUE_HEAD_ROWS:
        return None
    per_head = config.linear_value_head_dim if role in _CHANNELS else 1
    before = 2 * config.linear_num_key_heads * config.linear_key_head_dim if role in _AFTER_QK else 0
    return np.concatenate([np.arange(before), before + _value_rows(config, per_head)])


def column_order(config: ModelConfig, hf_name: str) -> np.ndarray | None:
    """Where each of the Hugging Face tensor's columns lies in the GGUF's, None when in place."""
    if _tiled_value_heads(config) and hf_name.endswith("linear_attn.out_proj.weight"):
        return _value_rows(config, config.linear_value_head_dim)
    return None


def restore_values(hf_name: str, values: np.ndarray) -> np.ndarray:
    """A tensor whose values (or shape) the converter changed, as Hugging Face has it."""
    if hf_name.endswith("linear_attn.A_log"):  # stored as -exp(A_log)
        return np.log(-values)
    if hf_name.endswith("linear_attn.conv1d.weight"):  # [C, K] -> Conv1d's [C, 1, K]
        return values[:, None, :]
    return values


def _tiled_value_heads(config: ModelConfig) -> bool:
    tiled = BY_NAME[config.architecture].gguf_tiled_value_heads
    return tiled and config.linear_num_value_heads > config.linear_num_key_heads > 0


def _value_rows(config: ModelConfig, per_head: int) -> np.ndarray:
    """The GGUF position of each Hugging Face value head's rows: head g * r + j (key group g, j-th of its r) lies at
    j * Hk + g."""
    groups = config.linear_num_key_heads
    per_group = config.linear_num_value_heads // groups
    heads = np.arange(config.linear_num_value_heads)
    stored = (heads % per_group) * groups + heads // per_group  # [Hv]
    return (stored[:, None] * per_head + np.arange(per_head)).reshape(-1)
