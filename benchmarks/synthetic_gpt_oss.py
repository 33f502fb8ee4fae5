"""`sagellm bench make-gpt-oss`: a gpt-oss-shaped GGUF of random weights, its experts in MXFP4, as llama.cpp's
converter lays out gpt-oss-20b (or a smaller shape), for speed and memory checks against llama.cpp on one file.

What decode speed and memory depend on is the shapes and the kinds, so this writes gpt-oss-20b's: 24 layers of
hidden 2880, 64 query and 8 KV heads of 64, 32 experts of 2880 with 4 used per token, a vocabulary of 201,088, even
layers sliding over 128 positions, YaRN; experts in MXFP4 (the checkpoint's own kind), attention, embedding and
output in Q8_0, norms, biases, sinks and the router in F32. MXFP4 blocks are made directly, random 4-bit codes
under an exponent that puts the weights at a trained model's spread (~0.02): quantizing 19 billion floats would take
most of an hour. The tokenizer is SmolLM2's (copied like make-gguf's), its token list padded to the vocabulary with
unused tokens. Tensors are made and written one at a time, so the peak is one tensor, not the model."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from sagellm.benchmarks.kquant_pack import quantize
from sagellm.benchmarks.synthetic_gguf import CHUNK_VALUES, WEIGHT_STD, padded_tokenizer, write_tensors

F32, Q8_0, MXFP4 = GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0, GGMLQuantizationType.MXFP4
MXFP4_EXPONENT = 120  # E8M0 2^(120 - 127): E2M1 codes (up to 6) times 1/128, about a trained model's spread


@dataclass(frozen=True)
class GptOssShape:
    hidden: int = 2880
    layers: int = 24
    experts: int = 32
    experts_used: int = 4
    intermediate: int = 2880
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    vocab: int = 201088
    window: int = 128


PRESETS = {"20b": GptOssShape(), "20b-4layers": GptOssShape(layers=4)}


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType
    std: float = WEIGHT_STD
    mean: float = 0.0

    @property
    def nbytes(self) -> int:
        inputs, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // inputs * size


def write_gpt_oss_mxfp4(
    path: str | Path, shape: GptOssShape, *, seed: int = 0, tokenizer_from: str | Path | None = None,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Write the gpt-oss GGUF of random weights for `shape` to `path`, tensor by tensor; returns `path`."""
    path = Path(path)
    tensors = list(_tensors(shape))
    writer = gguf.GGUFWriter(path, "gpt-oss")
    writer.add_name(f"synthetic-gpt-oss-{shape.layers}x{shape.experts}e-mxfp4")
    writer.add_description(f"random weights (seed {seed}), experts in MXFP4; sagellm bench make-gpt-oss")
    writer.add_context_length(131072)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_expert_feed_forward_length(shape.intermediate)
    writer.add_expert_count(shape.experts)
    writer.add_expert_used_count(shape.experts_used)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(150000.0)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(32.0)
    writer.add_rope_scaling_orig_ctx_len(4096)
    writer.add_sliding_window(shape.window)
    writer.add_vocab_size(shape.vocab)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (value, vtype, sub_type) in padded_tokenizer(tokenizer_from, shape.vocab).items():
        writer.add_key_value(key, value, vtype, sub_type)
    write_tensors(writer, path, tensors, _make, seed=seed, progress=progress)
    return path


def _tensors(s: GptOssShape):
    """llama.cpp's gpt-oss tensors (its converter's names), each with its kind."""
    q, kv, h, e, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.experts, s.intermediate
    yield _Tensor("token_embd.weight", (s.vocab, h), Q8_0)
    for n in range(s.layers):
        b = f"blk.{n}."
        yield _Tensor(b + "attn_norm.weight", (h,), F32, 0.02, 1.0)
        for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            yield _Tensor(f"{b}{name}.weight", (rows, h), Q8_0)
            yield _Tensor(f"{b}{name}.bias", (rows,), F32)
        yield _Tensor(b + "attn_output.weight", (h, q), Q8_0)
        yield _Tensor(b + "attn_output.bias", (h,), F32)
        yield _Tensor(b + "attn_sinks.weight", (s.heads,), F32, 1.0)
        yield _Tensor(b + "post_attention_norm.weight", (h,), F32, 0.02, 1.0)
        yield _Tensor(b + "ffn_gate_inp.weight", (e, h), F32)
        yield _Tensor(b + "ffn_gate_inp.bias", (e,), F32)
        for name, rows, cols in (("ffn_gate_exps", i, h), ("ffn_up_exps", i, h), ("ffn_down_exps", h, i)):
            yield _Tensor(f"{b}{name}.weight", (e, rows, cols), MXFP4)
            yield _Tensor(f"{b}{name}.bias", (e, rows), F32)
    yield _Tensor("output_norm.weight", (h,), F32, 0.02, 1.0)
    yield _Tensor("output.weight", (s.vocab, h), Q8_0)


def _make(tensor: _Tensor, seeds: np.random.SeedSequence, pool: ThreadPoolExecutor) -> np.ndarray:
    """The tensor's random values in its kind, a chunk of rows at a time (each chunk its own generator)."""
    if tensor.qtype == F32:
        values = np.random.default_rng(seeds).standard_normal(tensor.shape, dtype=np.float32)
        return values * np.float32(tensor.std) + np.float32(tensor.mean)
    rows, cols = int(np.prod(tensor.shape[:-1], dtype=np.int64)), tensor.shape[-1]
    blocks = np.empty((rows, tensor.nbytes // rows), np.uint8)
    step = max(1, CHUNK_VALUES // cols)
    starts = range(0, rows, step)

    def chunk(start: int, chunk_seed: np.random.SeedSequence) -> None:
        end, rng = min(rows, start + step), np.random.default_rng(chunk_seed)
        if tensor.qtype == MXFP4:  # per block: the exponent byte, then 16 bytes of random 4-bit codes
            made = rng.integers(0, 256, (end - start, cols // 32, 17), dtype=np.uint8)
            made[..., 0] = MXFP4_EXPONENT
            blocks[start:end] = made.reshape(end - start, -1)
        else:
            values = rng.standard_normal((end - start, cols), dtype=np.float32) * np.float32(tensor.std)
            blocks[start:end] = quantize(values, tensor.qtype)

    list(pool.map(chunk, starts, seeds.spawn(len(starts))))  # list(): raise a worker's error here
    return blocks.reshape(*tensor.shape[:-1], -1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="20b", help="model shape (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    write_gpt_oss_mxfp4(args.out, PRESETS[args.preset], seed=args.seed)
    size = args.out.stat().st_size
    print(f"{args.out}: preset {args.preset}, {size / 1e9:.2f} GB, written in {time.monotonic() - start:.0f} s")
    return 0
