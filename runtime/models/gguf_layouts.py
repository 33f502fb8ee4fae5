"""llama.cpp's rearrangements of Hugging Face tensors, undone at load so a GGUF's weights equal the checkpoint's.

One is a reorder of rows (so it applies to a weight kept as its quantized blocks as well as to its floats): the
rotary pairs of llama-arch q/k rows. Two change values: Qwen3.5's A_log is stored as -exp(A_log), and its
convolution squeezed to [C, K]. One is kept as stored: Qwen3.5's value heads, tiled by key head when there are more
value heads than key heads ([K0, K1, ..., K0, K1, ...] where Hugging Face groups them: [K0's, K1's, ...]); they run
along out_proj's input columns too, which no reorder of blocks reaches, so the model computes in the file's order
instead (ModelConfig.linear_value_heads_tiled)."""

from __future__ import annotations

import numpy as np

from sagellm.runtime.models.architectures.families import BY_NAME
from sagellm.runtime.models.config import ModelConfig


def row_order(config: ModelConfig, hf_name: str) -> np.ndarray | None:
    """Where each of the Hugging Face tensor's rows lies in the GGUF's (`hf = gguf[order]`), None when in place."""
    arch = BY_NAME[config.architecture]
    if arch.gguf_qk_permuted and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_heads if hf_name.endswith("q_proj.weight") else config.num_kv_heads
        rows = heads * config.head_dim
        return np.arange(rows).reshape(heads, config.head_dim // 2, 2).swapaxes(1, 2).reshape(rows)
    return None


def restore_values(hf_name: str, values: np.ndarray) -> np.ndarray:
    """A tensor whose values (or shape) the converter changed, as Hugging Face has it."""
    if hf_name.endswith("linear_attn.A_log"):  # stored as -exp(A_log)
        return np.log(-values)
    if hf_name.endswith("linear_attn.conv1d.weight"):  # [C, K] -> Conv1d's [C, 1, K]
        return values[:, None, :]
    return values
