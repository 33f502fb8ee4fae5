"""Our whole-tensor dequantization against gguf-py's, bit for bit, on random bytes (so NaN and infinite scales and
values too): the fast kinds and the kinds left to gguf-py alike."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from sagellm.runtime.models.dequantize import dequantize

Q = GGMLQuantizationType
FAST = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
FALLBACK = (Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K)  # what the loader also takes, through gguf-py


def random_tensor(kind: GGMLQuantizationType, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random stored bytes of a `kind` tensor of `shape`, read-only as the mapped file's are."""
    block, block_bytes = GGML_QUANT_SIZES[kind]
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) // block * block_bytes, dtype=np.uint8)
    raw.setflags(write=False)
    return raw


@pytest.mark.parametrize("kind", FAST + FALLBACK, ids=lambda k: k.name)
@pytest.mark.parametrize("shape", [(3, 512), (1024,), (2, 4, 256)])
def test_equals_gguf_py_bit_for_bit(kind: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    raw = random_tensor(kind, shape)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf scales: same IEEE arithmetic on both sides
        expected = gguf_dequantize(raw.reshape(-1, raw.size // int(np.prod(shape[:-1]))), kind).reshape(shape)
        values = dequantize(raw, kind, shape)
    assert values.dtype == np.float32 and values.shape == shape
    assert np.array_equal(values.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("kind", FAST, ids=lambda k: k.name)
def test_values_own_their_memory(kind: GGMLQuantizationType) -> None:
    """torch.from_numpy needs a writable array, and the weights must not pin the mapped file (F32 is a copy)."""
    raw = random_tensor(kind, (4, 64))
    with np.errstate(invalid="ignore", over="ignore"):
        values = dequantize(raw, kind, (4, 64))
    assert values.flags.writeable and not np.shares_memory(values, raw)
