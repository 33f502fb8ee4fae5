"""`sagellm bench make-qwen35`: a Qwen3.5-shaped GGUF of random weights in llama.cpp's Q4_K_M mix, as its converter
and llama-quantize lay out Qwen3.5-0.8B, for decode speed against llama.cpp on one file.

Qwen3.5-0.8B's shapes: 24 layers of hidden 1024, every fourth gated attention (8 query heads and 2 KV heads of
256, a quarter of each turned by rope) and the others Gated DeltaNet (16 key and 16 value heads of 128, a 4-wide
convolution), an MLP of 3584, a tied vocabulary of 248,320. The mix is llama-quantize's for this architecture: Q4_K,
with the DeltaNet's fused input projection (`attn_qkv`) in Q5_K, the embedding (tied: also the output) in Q6_K, and
attn_v and ffn_down in Q6_K where `use_more_bits` picks them (counted over the attention layers' attn_v); the
convolution, norms, decays and biases in F32. Values are random at a trained model's spread, the decays negative,
norms stored as 1 + w as the converter does. The tokenizer is SmolLM2's, padded to the vocabulary."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from sagellm.benchmarks.kquant_pack import use_more_bits
from sagellm.benchmarks.synthetic_gguf import WEIGHT_STD, padded_tokenizer, random_blocks, write_tensors

F32, Q4_K, Q5_K, Q6_K = (GGMLQuantizationType[k] for k in ("F32", "Q4_K", "Q5_K", "Q6_K"))


@dataclass(frozen=True)
class Qwen35Shape:
    hidden: int = 1024
    layers: int = 24
    full_attention_interval: int = 4
    intermediate: int = 3584
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 256
    linear_key_heads: int = 16
    linear_value_heads: int = 16
    linear_head_dim: int = 128
    conv_kernel: int = 4
    vocab: int = 248320

    def is_linear(self, layer: int) -> bool:
        return (layer + 1) % self.full_attention_interval != 0


PRESETS = {"0.8b": Qwen35Shape(), "0.8b-4layers": Qwen35Shape(layers=4)}


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType
    std: float = WEIGHT_STD
    mean: float = 0.0
    negative: bool = False  # -|values|: a decay (ssm_a is -exp(A_log))

    @property
    def nbytes(self) -> int:
        inputs, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // inputs * size


def write_qwen35_q4_k_m(
    path: str | Path, shape: Qwen35Shape, *, seed: int = 0, tokenizer_from: str | Path | None = None,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Write the Qwen3.5 GGUF of random weights for `shape` to `path`, tensor by tensor; returns `path`."""
    path = Path(path)
    writer = gguf.GGUFWriter(path, "qwen35")
    writer.add_name(f"synthetic-qwen35-{shape.layers}l-q4_k_m")
    writer.add_description(f"random weights (seed {seed}) in llama.cpp's Q4_K_M mix; sagellm bench make-qwen35")
    writer.add_context_length(262144)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10_000_000.0)
    writer.add_rope_dimension_count(shape.head_dim // 4)
    writer.add_rope_dimension_sections([11, 11, 10, 0])
    writer.add_ssm_conv_kernel(shape.conv_kernel)
    writer.add_ssm_state_size(shape.linear_head_dim)
    writer.add_ssm_group_count(shape.linear_key_heads)
    writer.add_ssm_time_step_rank(shape.linear_value_heads)
    writer.add_ssm_inner_size(shape.linear_head_dim * shape.linear_value_heads)
    writer.add_full_attention_interval(shape.full_attention_interval)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (value, vtype, sub_type) in padded_tokenizer(tokenizer_from, shape.vocab).items():
        writer.add_key_value(key, value, vtype, sub_type)
    write_tensors(writer, path, list(_tensors(shape)), _make, seed=seed, progress=progress)
    return path


def _tensors(s: Qwen35Shape):
    """llama.cpp's Qwen3.5 tensors (its converter's names), each with its Q4_K_M kind."""
    h, inter = s.hidden, s.intermediate
    keys, values = s.linear_key_heads * s.linear_head_dim, s.linear_value_heads * s.linear_head_dim
    attention_layers = [n for n in range(s.layers) if not s.is_linear(n)]
    norm = {"std": 0.02, "mean": 1.0}
    yield _Tensor("token_embd.weight", (s.vocab, h), Q6_K)  # tied: the output too
    for n in range(s.layers):
        b = f"blk.{n}."
        yield _Tensor(b + "attn_norm.weight", (h,), F32, **norm)
        if s.is_linear(n):
            yield _Tensor(b + "attn_qkv.weight", (2 * keys + values, h), Q5_K)
            yield _Tensor(b + "attn_gate.weight", (values, h), Q4_K)
            yield _Tensor(b + "ssm_conv1d.weight", (2 * keys + values, s.conv_kernel), F32, 0.3)
            yield _Tensor(b + "ssm_dt.bias", (s.linear_value_heads,), F32, 1.0)
            yield _Tensor(b + "ssm_a", (s.linear_value_heads,), F32, 2.0, 0.5, negative=True)
            yield _Tensor(b + "ssm_beta.weight", (s.linear_value_heads, h), Q4_K)
            yield _Tensor(b + "ssm_alpha.weight", (s.linear_value_heads, h), Q4_K)
            yield _Tensor(b + "ssm_norm.weight", (s.linear_head_dim,), F32, **norm)
            yield _Tensor(b + "ssm_out.weight", (h, values), Q4_K)
        else:
            q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
            v_kind = Q6_K if use_more_bits(attention_layers.index(n), len(attention_layers)) else Q4_K
            yield _Tensor(b + "attn_q.weight", (2 * q, h), Q4_K)  # each head's query and gate
            yield _Tensor(b + "attn_k.weight", (kv, h), Q4_K)
            yield _Tensor(b + "attn_v.weight", (kv, h), v_kind)
            yield _Tensor(b + "attn_output.weight", (h, q), Q4_K)
            yield _Tensor(b + "attn_q_norm.weight", (s.head_dim,), F32, **norm)
            yield _Tensor(b + "attn_k_norm.weight", (s.head_dim,), F32, **norm)
        yield _Tensor(b + "post_attention_norm.weight", (h,), F32, **norm)
        yield _Tensor(b + "ffn_gate.weight", (inter, h), Q4_K)
        yield _Tensor(b + "ffn_up.weight", (inter, h), Q4_K)
        yield _Tensor(b + "ffn_down.weight", (h, inter), Q6_K if use_more_bits(n, s.layers) else Q4_K)
    yield _Tensor("output_norm.weight", (h,), F32, **norm)


def _make(tensor: _Tensor, seeds: np.random.SeedSequence, pool: ThreadPoolExecutor) -> np.ndarray:
    """The tensor's random values in its kind: floats, or blocks made a chunk of rows at a time."""
    if tensor.qtype == F32:
        values = np.random.default_rng(seeds).standard_normal(tensor.shape, dtype=np.float32) * np.float32(tensor.std)
        values = -np.abs(values) - np.float32(tensor.mean) if tensor.negative else values + np.float32(tensor.mean)
        return values
    return random_blocks(tensor.shape, tensor.qtype, tensor.nbytes, tensor.std, seeds, pool)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.8b", help="model shape (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    write_qwen35_q4_k_m(args.out, PRESETS[args.preset], seed=args.seed)
    size = args.out.stat().st_size
    print(f"{args.out}: preset {args.preset}, {size / 1e9:.2f} GB, written in {time.monotonic() - start:.0f} s")
    return 0
