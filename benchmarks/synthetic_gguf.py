"""`sagellm bench make-gguf`: a Llama-shaped Q4_K_M GGUF of random weights, 1B or 7B, for memory and speed checks.

A file people download (Llama-2-7B.Q4_K_M.gguf) is gigabytes and behind a login; what the engine's memory and
speed depend on is only its shapes and kinds, so this writes them: random weights scaled as a trained model's
(N(0, 0.02) for linears and the embedding, norms ~1), quantized with llama.cpp's Q4_K_M mix of types
(kquant_pack.q4_k_m_type: Q4_K, Q6_K for the output and some attn_v / ffn_down), and the SmolLM2 GGUF's tokenizer
(tokenizer.* keys: tokens, merges, chat template) so `sagellm serve` and llama.cpp can tokenize; the vocabulary is
its 49,152 tokens. Tensors are made and written one at a time, a few million values per worker at a time, so the
peak is about one tensor's blocks, not the model's floats: the 7B file is written on a machine with less RAM than
its fp32 weights."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, TokenType

from sagellm.benchmarks.kquant_pack import q4_k_m_type, quantize

WEIGHT_STD = 0.02  # a trained Llama's linears and embedding are about this spread (its init, and after training)
NORM_STD = 0.02  # norms: 1 plus this much noise
CHUNK_VALUES = 1 << 21  # values made and quantized at a time per worker: temporaries of a few times 8 MB
CONTEXT_LENGTH = 4096  # llama.context_length: Llama 2's


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool


PRESETS = {
    "1b": Shape(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, tied=True),  # ~1.07B, ~0.65 GB
    "7b": Shape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, tied=False),  # Llama-2-7B's, ~4 GB
}


@dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order: [rows, cols] or [cols]
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        inputs, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // inputs * size


def write_llama_q4_k_m(
    path: str | Path,
    *,
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    tied: bool,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a Llama GGUF of random weights in llama.cpp's Q4_K_M mix to `path`, streaming tensor by tensor.
    `tokenizer_from`: a GGUF (or a folder holding one) whose tokenizer.* keys are copied (default: SmolLM2-135M's
    from the model cache); the vocabulary is its token count. `workers`: threads making and quantizing chunks
    (default: every core; numpy releases the GIL in both). Returns `path`."""
    path = Path(path)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must split into {heads} heads, and those into {kv_heads} KV heads")
    tokenizer = _tokenizer_fields(_gguf_file(tokenizer_from))
    vocab = len(tokenizer["tokenizer.ggml.tokens"][0])
    shape = Shape(hidden, layers, intermediate, heads, kv_heads, tied)
    tensors = list(_tensors(shape, vocab))
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"synthetic-llama-{_size_label(shape, vocab)}-q4_k_m")
    writer.add_description(f"random weights (seed {seed}) in llama.cpp's Q4_K_M mix; sagellm bench make-gguf")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (value, vtype, sub_type) in tokenizer.items():
        writer.add_key_value(key, value, vtype, sub_type)
    write_tensors(writer, path, tensors, _make, seed=seed, workers=workers, progress=progress)
    return path


def write_tensors(
    writer: gguf.GGUFWriter, path: Path, tensors: list, make: Callable, *, seed: int, workers: int | None = None,
    progress: bool = True,
) -> None:  # fmt: skip
    """Write `tensors` (each with name, shape, qtype and nbytes) after the writer's metadata, streaming: each made by
    `make(tensor, seeds, pool)` only when written (its own seed, so the file does not depend on the workers), the
    progress shown; closes the writer."""
    for tensor in tensors:
        raw = np.dtype(np.float32) if tensor.qtype == GGMLQuantizationType.F32 else np.dtype(np.uint8)
        byte_shape = (*tensor.shape[:-1], tensor.nbytes // int(np.prod(tensor.shape[:-1], dtype=np.int64)))
        stored = tensor.shape if raw == np.float32 else byte_shape
        writer.add_tensor_info(tensor.name, stored, raw, tensor.nbytes, raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    shown = _Progress(path, len(tensors), sum(t.nbytes for t in tensors), progress)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for index, tensor in enumerate(tensors):
            writer.write_tensor_data(make(tensor, np.random.SeedSequence([seed, index]), pool))
            shown.update(index + 1, tensor.nbytes)
    writer.close()
    shown.done()


def _tensors(shape: Shape, vocab: int) -> Iterator[_Tensor]:
    """llama.cpp's tensors of a Llama in its file order, each with its Q4_K_M type (F32 for norms)."""
    f32 = GGMLQuantizationType.F32
    kv = shape.hidden // shape.heads * shape.kv_heads

    def linear(name: str, rows: int, cols: int) -> _Tensor:
        return _Tensor(name, (rows, cols), q4_k_m_type(name, shape.layers, cols, shape.tied))

    yield linear("token_embd.weight", vocab, shape.hidden)
    for i in range(shape.layers):
        yield _Tensor(f"blk.{i}.attn_norm.weight", (shape.hidden,), f32)
        yield linear(f"blk.{i}.attn_q.weight", shape.hidden, shape.hidden)
        yield linear(f"blk.{i}.attn_k.weight", kv, shape.hidden)
        yield linear(f"blk.{i}.attn_v.weight", kv, shape.hidden)
        yield linear(f"blk.{i}.attn_output.weight", shape.hidden, shape.hidden)
        yield _Tensor(f"blk.{i}.ffn_norm.weight", (shape.hidden,), f32)
        yield linear(f"blk.{i}.ffn_gate.weight", shape.intermediate, shape.hidden)
        yield linear(f"blk.{i}.ffn_up.weight", shape.intermediate, shape.hidden)
        yield linear(f"blk.{i}.ffn_down.weight", shape.hidden, shape.intermediate)
    yield _Tensor("output_norm.weight", (shape.hidden,), f32)
    if not shape.tied:
        yield linear("output.weight", vocab, shape.hidden)


def _make(tensor: _Tensor, seeds: np.random.SeedSequence, pool: ThreadPoolExecutor) -> np.ndarray:
    """The tensor's random values in its type: a norm as floats, a linear as blocks made a chunk of rows at a time
    (each chunk its own generator, so the file does not depend on the number of workers)."""
    if tensor.qtype == GGMLQuantizationType.F32:
        values = np.random.default_rng(seeds).standard_normal(tensor.shape, dtype=np.float32)
        return values * np.float32(NORM_STD) + np.float32(1.0)
    return random_blocks(tensor.shape, tensor.qtype, tensor.nbytes, WEIGHT_STD, seeds, pool)


def random_blocks(
    shape: tuple[int, int], qtype: GGMLQuantizationType, nbytes: int, std: float, seeds: np.random.SeedSequence,
    pool: ThreadPoolExecutor,
) -> np.ndarray:  # fmt: skip
    """Random N(0, std) weights [rows, cols] quantized to `qtype` ([rows, nbytes / rows] bytes), made a chunk of
    rows at a time by the pool's workers, each chunk its own generator (so the file does not depend on the number
    of workers)."""
    rows, cols = shape
    blocks = np.empty((rows, nbytes // rows), np.uint8)
    step = max(1, CHUNK_VALUES // cols)
    starts = range(0, rows, step)

    def chunk(start: int, chunk_seed: np.random.SeedSequence) -> None:
        end = min(rows, start + step)
        values = np.random.default_rng(chunk_seed).standard_normal((end - start, cols), dtype=np.float32)
        blocks[start:end] = quantize(values * np.float32(std), qtype)

    list(pool.map(chunk, starts, seeds.spawn(len(starts))))  # list(): raise a worker's error here
    return blocks


def _gguf_file(source: str | Path | None) -> Path:
    """The GGUF `source` names (a file, or a folder or cache alias holding one; default SmolLM2-135M's)."""
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    found = Path(resolve_model(str(source) if source else DEFAULT_MODEL))
    if found.is_dir():
        files = sorted(found.glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file in {found} to copy a tokenizer from")
        found = files[0]
    return found


def _tokenizer_fields(path: Path) -> dict[str, tuple[object, GGUFValueType, GGUFValueType | None]]:
    """Every tokenizer.* key of the GGUF at `path` (tokens, types, merges, special ids, chat template), as
    (value, type, array item type) for GGUFWriter.add_key_value."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        fields[key] = (field.contents(), vtype, sub_type)
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens to copy")
    return fields


def padded_tokenizer(tokenizer_from: str | Path | None, vocab: int) -> dict:
    """The tokenizer keys of `tokenizer_from` (default SmolLM2's), its tokens and their types padded with unused
    tokens to `vocab`: a larger model's vocabulary over a small tokenizer."""
    source = _gguf_file(tokenizer_from)
    fields = _tokenizer_fields(source)
    tokens = list(fields["tokenizer.ggml.tokens"][0])
    types = list(fields["tokenizer.ggml.token_type"][0])
    pad = vocab - len(tokens)
    if pad < 0:
        raise ValueError(f"{source}'s {len(tokens)} tokens do not fit a vocabulary of {vocab}")
    fields["tokenizer.ggml.tokens"] = ([*tokens, *(f"[PAD{n}]" for n in range(pad))], GGUFValueType.ARRAY,
                                       GGUFValueType.STRING)  # fmt: skip
    fields["tokenizer.ggml.token_type"] = ([*types, *[int(TokenType.UNUSED)] * pad], GGUFValueType.ARRAY,
                                           GGUFValueType.INT32)  # fmt: skip
    return fields


def _size_label(shape: Shape, vocab: int) -> str:
    kv = shape.hidden // shape.heads * shape.kv_heads
    per_layer = 2 * shape.hidden * (shape.hidden + kv) + 3 * shape.hidden * shape.intermediate
    params = shape.layers * per_layer + vocab * shape.hidden * (1 if shape.tied else 2)
    return f"{params / 1e9:.1f}B"


class _Progress:
    """A line on stderr every few seconds (redrawn in place on a terminal): tensors and bytes written, seconds."""

    def __init__(self, path: Path, count: int, total: int, enabled: bool) -> None:
        self.path, self.count, self.total, self.enabled = path, count, total, enabled
        self.written, self.start, self.shown = 0, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int, nbytes: int) -> None:
        self.written += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.shown >= (0.5 if self.tty else 5.0) or done == self.count):
            self.shown = now
            line = (
                f"make-gguf: {self.path.name}: {done}/{self.count} tensors, {self.written / 1e9:.2f} of "
                f"{self.total / 1e9:.2f} GB, {now - self.start:.0f} s"
            )
            print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b", help="model shape (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    parser.add_argument("--tokenizer-from", default=None, help="GGUF whose tokenizer is copied (default: SmolLM2's)")


def run(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    write_llama_q4_k_m(args.out, **vars(preset), seed=args.seed, tokenizer_from=args.tokenizer_from)
    size = args.out.stat().st_size
    print(f"{args.out}: preset {args.preset}, {size / 1e9:.2f} GB, written in {time.monotonic() - start:.0f} s")
    return 0
