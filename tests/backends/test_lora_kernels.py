"""Batched LoRA (`add_lora`): the torch op, the native CPU op (lora.c) and the triton kernel against a float64
reference taken row by row, out[t] + x[t] @ A[s].T @ B[s].T, rows of slot -1 left bit for bit as they were.

Each case runs for each: the torch and native ops here, the triton kernel in a fresh Python under triton's CPU
interpreter (`test_kernel_cases_under_cpu_interpreter`, as test_triton_kernels.py does: triton reads TRITON_INTERPRET
when first imported), and natively here on a CUDA machine. Nothing is timed: speed lives in benchmarks."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sagellm.backends.native import NativeKernels
from sagellm.backends.native.lora import add_lora as native_add_lora
from sagellm.backends.torch_ops.lora import add_lora as torch_add_lora

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU = torch.device("cpu")
TRITON_HERE = INTERPRETED or torch.cuda.is_available()
AddLora = Callable[..., torch.Tensor]


@dataclass
class Impl:
    add_lora: AddLora
    device: torch.device


@pytest.fixture(
    params=[
        pytest.param("torch"),
        pytest.param("native"),
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                not TRITON_HERE, reason="run by test_kernel_cases_under_cpu_interpreter (needs TRITON_INTERPRET=1)"
            ),
        ),
    ]
)
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "torch":
        return Impl(torch_add_lora, CPU)
    if request.param == "native":
        return Impl(functools.partial(_native_add_lora, NativeKernels.load(), 2), CPU)
    pytest.importorskip("triton")
    from sagellm.backends.triton_kernels.lora import add_lora

    return Impl(add_lora, torch.device("cpu" if INTERPRETED else "cuda"))


def _native_add_lora(native: NativeKernels | None, threads: int, *args: torch.Tensor) -> torch.Tensor:
    """The native op, which must take every fp32 case (bf16 rows are the torch op's); B handed over as the engine's
    slots hand it: the transposed view of a contiguous B^T."""
    out, x, row_slots, lora_a, lora_b = args
    assert native is not None, "a C compiler is on PATH, so the native kernels must build"
    if torch.float32 != out.dtype or x.dtype != torch.float32:
        pytest.skip("the native op reads fp32 only (bf16 runs the torch op)")
    lora_b = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    added = native_add_lora(native, out, x, row_slots, lora_a, lora_b, threads)
    assert added is not None, "fp32 rows the native op reads"
    return added


@dataclass
class Batch:
    out: torch.Tensor  # [T, N]
    x: torch.Tensor  # [T, K]
    row_slots: torch.Tensor  # int64 [T]
    lora_a: torch.Tensor  # [S, R, K]
    lora_b: torch.Tensor  # [S, N, R]

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.out, self.x, self.row_slots, self.lora_a, self.lora_b


def make_batch(
    row_slots: list[int],
    in_features: int = 64,
    out_features: int = 48,
    rank: int = 16,
    num_slots: int = 3,
    dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    device: torch.device = CPU,
    seed: int = 0,
) -> Batch:
    """Random rows and adapters scaled so that an update is about as large as out's values (~1)."""
    g = torch.Generator().manual_seed(seed)
    tokens = len(row_slots)
    x = torch.randn(tokens, in_features, generator=g)
    a = torch.randn(num_slots, rank, in_features, generator=g) / in_features**0.5
    b = torch.randn(num_slots, out_features, rank, generator=g) / rank**0.5
    out = torch.randn(tokens, out_features, generator=g)
    slots = torch.tensor(row_slots, dtype=torch.int64)
    x, a, b = (t.to(device, dtype) for t in (x, a, b))
    return Batch(out.to(device, out_dtype or dtype), x, slots.to(device), a, b)


def reference(batch: Batch) -> torch.Tensor:
    """out + each adapter row's update, row by row in float64 from the values as given (bf16 ones exactly)."""
    expected = batch.out.cpu().double()  # [T, N]
    a, b, x = (t.cpu().double() for t in (batch.lora_a, batch.lora_b, batch.x))
    for t, s in enumerate(batch.row_slots.tolist()):
        if s >= 0:
            expected[t] += b[s] @ (a[s] @ x[t])
    return expected


def check(impl: Impl, batch: Batch) -> None:
    """add_lora returns out itself, leaves its rows of slot -1 untouched and adds the reference's updates to the rest
    (to fp32 accuracy, or within a bf16 out's rounding: the interpreter truncates)."""
    before, expected = batch.out.clone(), reference(batch)
    assert impl.add_lora(*batch.args()) is batch.out
    plain = batch.row_slots < 0
    assert torch.equal(batch.out[plain], before[plain])
    tolerance = 1e-2 if batch.out.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(batch.out.cpu().double(), expected, rtol=tolerance, atol=tolerance)


MIXED = [-1, 2, 0, -1, 1, 2, 2, -1, 0, 0, 1, -1, 2]  # every slot and rows without an adapter, interleaved
PREFILL = [0, 2, -1, 1] + [0] * 120 + [-1] * 100 + [2] * 76  # 4 decodes, then 3 prompts' runs: T = 300
CASES = {
    "mixed": {"row_slots": MIXED},
    "one_slot": {"row_slots": [1] * 9},
    "one_row": {"row_slots": [2]},
    "300_rows": {"row_slots": PREFILL},
    "fused_qkv": {"row_slots": MIXED, "in_features": 32, "out_features": 96},  # N = 3K
    "rank_8": {"row_slots": MIXED, "rank": 8},  # narrower than a tl.dot's 16: masked
    "bf16": {"row_slots": MIXED, "dtype": torch.bfloat16},  # a bf16 model: x, adapters and out
    "bf16_x": {"row_slots": MIXED, "dtype": torch.bfloat16, "out_dtype": torch.float32},
    "bf16_one_slot": {"row_slots": [0] * 5, "dtype": torch.bfloat16},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_add_lora_matches_row_by_row_reference(impl: Impl, case: dict) -> None:
    check(impl, make_batch(**case, device=impl.device, seed=len(case["row_slots"])))


@pytest.mark.parametrize("tokens", [1, 7])
def test_no_adapter_rows_leave_out_as_it_was(impl: Impl, tokens: int) -> None:
    batch = make_batch([-1] * tokens, device=impl.device)
    before = batch.out.clone()
    assert impl.add_lora(*batch.args()) is batch.out
    assert torch.equal(batch.out, before)


def test_rank_padded_with_zeros_adds_what_the_unpadded_rank_does(impl: Impl) -> None:
    """Adapters of rank 8 stacked at R = 32, their A rows and B columns 8.. zero: the same update."""
    batch = make_batch(MIXED, rank=8, device=impl.device)
    padded_a = torch.zeros(3, 32, 64, device=impl.device)
    padded_b = torch.zeros(3, 48, 32, device=impl.device)
    padded_a[:, :8], padded_b[:, :, :8] = batch.lora_a, batch.lora_b
    padded = impl.add_lora(batch.out.clone(), batch.x, batch.row_slots, padded_a, padded_b)
    torch.testing.assert_close(padded.cpu().double(), reference(batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, impl.add_lora(*batch.args()), rtol=1e-6, atol=1e-6)


def test_strided_views_of_a_fused_output(impl: Impl) -> None:
    """out one slice of a fused qkv output (the k columns), x a view of wider rows: only that slice changes."""
    batch = make_batch(MIXED, device=impl.device)
    tokens = len(MIXED)
    fused = torch.randn(tokens, 3 * 48, device=impl.device)
    wide_x = torch.randn(tokens, 64 + 8, device=impl.device)
    fused[:, 48:96], wide_x[:, 8:] = batch.out, batch.x
    before = fused.clone()
    view = Batch(fused[:, 48:96], wide_x[:, 8:], batch.row_slots, batch.lora_a, batch.lora_b)
    check(impl, view)
    assert torch.equal(fused[:, :48], before[:, :48]) and torch.equal(fused[:, 96:], before[:, 96:])


class CountCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called while it is on, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204  (torch's protocol)
        self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("row_slots", "matmuls"),
    [
        ([3, -1, 0, 3, -1, 0, 3], 1),  # slots 0 and 3 of 4: one shrink by every slot (masked), one expand (addmm)
        ([3, 3, 3], 1),
        ([-1, -1], 0),  # no adapter: no work
    ],
)
def test_torch_op_takes_three_calls_whatever_the_slots(row_slots: list[int], matmuls: int) -> None:
    """The work the torch op does, counted rather than timed: no gather, no scatter, no loop over slots."""
    batch = make_batch(row_slots, num_slots=4)
    with CountCalls() as counted:
        torch_add_lora(*batch.args())
    assert counted.calls["mm"] == matmuls and counted.calls["addmm_"] == matmuls
    assert counted.calls["index_select"] == counted.calls["index_add_"] == 0


def test_torch_op_at_serving_sizes() -> None:
    """A prefill-sized batch on 8 adapters of rank 64 and a fused qkv's width, rows of all slots and of none
    shuffled: a sanity check at sizes like a benchmark's, not timed."""
    g = torch.Generator().manual_seed(8)
    row_slots = torch.randint(-1, 8, (256,), generator=g).tolist()
    batch = make_batch(row_slots, in_features=512, out_features=1536, rank=64, num_slots=8, seed=8)
    check(Impl(torch_add_lora, CPU), batch)


@pytest.mark.parametrize("threads", [1, 2])
def test_native_op_on_every_instruction_set_and_thread_count(native: NativeKernels, threads: int) -> None:
    """Each library this CPU runs, one thread and two (the shrink's dot products and the expand's column tiles
    shared): a fused q/k/v's width of 1 + 64 tiles, every slot and none."""
    g = torch.Generator().manual_seed(threads)
    row_slots = torch.randint(-1, 4, (23,), generator=g).tolist()
    batch = make_batch(row_slots, in_features=96, out_features=1040, rank=16, num_slots=4, seed=threads)
    check(Impl(functools.partial(_native_add_lora, native, threads), CPU), batch)


def test_native_op_declines_what_it_does_not_read() -> None:
    """B not the transposed view of a contiguous B^T, or bf16 rows: None, and the torch op runs instead."""
    native = NativeKernels.load()
    batch = make_batch(MIXED)
    assert native_add_lora(native, *batch.args(), 1) is None  # make_batch's B [S, N, R] is contiguous itself
    bf16 = make_batch(MIXED, dtype=torch.bfloat16)
    lora_b = bf16.lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    assert native_add_lora(native, bf16.out, bf16.x, bf16.row_slots, bf16.lora_a, lora_b, 1) is None


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="is the interpreter's parent")
@pytest.mark.skipif(  # where pyproject.toml installs triton
    (platform.system(), platform.machine()) != ("Linux", "x86_64"), reason="triton is a dependency on Linux x86_64 only"
)
def test_kernel_cases_under_cpu_interpreter() -> None:
    """This file's triton cases in a fresh Python with TRITON_INTERPRET=1: all must run and pass."""
    here = Path(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider", "-k", "triton"]
    result = subprocess.run(command, cwd=here.parents[2], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout
