"""The native C kernels of the CPU backend against the torch ops they replace, the backend's dispatch between the
two, the build's failure modes, and greedy tokens of an engine with native kernels == an engine without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import torch

from sagellm import SamplingParams
from sagellm.backends import torch_ops
from sagellm.backends.cpu import NATIVE_LINEAR_ROWS, NATIVE_SERIAL_ROWS, CpuBackend, NativeDispatch
from sagellm.backends.cpu_linear import linear, pack_linear_weight
from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec
from sagellm.backends.native import DISABLE_ENV, NativeBuildError, NativeKernels, NativeShapeError, build, isa
from sagellm.backends.torch_ops.linear_attention import gated_rmsnorm
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=atol)


def strided_rows(rows: int, cols: int, pad: int = 8) -> torch.Tensor:
    """[rows, cols] fp32 whose rows are `cols + pad` apart: a view, like the column slices the model graph makes."""
    return torch.randn(rows, cols + pad)[:, :cols]


@pytest.mark.parametrize("rows", [1, NATIVE_LINEAR_ROWS, 5])
@pytest.mark.parametrize(("k", "n"), [(576, 960), (1536, 576), (40, 7)])  # 40: not a multiple of the 32-wide loop
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(native: NativeKernels, rows: int, k: int, n: int, with_bias: bool) -> None:
    x, weight = strided_rows(rows, k), torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    close(native.linear(x, weight, bias), expected, atol=1e-4)


def test_fp32_weights_keep_their_dense_layout_for_the_native_linear(native: NativeKernels) -> None:
    embedding = torch.randn(4096, 64)  # a vocabulary projection tied to the embedding: the same tensor
    assert pack_linear_weight(embedding, native).dense is embedding
    gate_up = pack_linear_weight(torch.randn(3072, 64), native)
    assert gate_up.rows is None, "the dense weight serves one-row calls; no [in, out] copy besides"
    assert pack_linear_weight(torch.randn(8, 8, dtype=torch.float64), native).dense is None
    assert pack_linear_weight(embedding).dense is None


@pytest.mark.parametrize("rows", [1, NATIVE_LINEAR_ROWS + 1])
def test_dispatched_linear(dispatch: NativeDispatch, rows: int) -> None:
    weight = pack_linear_weight(torch.randn(96, 64), dispatch.native)
    x, bias = torch.randn(rows, 64), torch.randn(96)
    close(dispatch.linear(x, weight, bias), linear(x, weight, bias), atol=1e-4)


@pytest.mark.parametrize(("rows", "threads"), [(1, 1), (3, 1), (NATIVE_SERIAL_ROWS, 1), (301, 2)])
@pytest.mark.parametrize("hidden", [64, 576, 100])
def test_rmsnorm_and_add_rmsnorm(native: NativeKernels, rows: int, threads: int, hidden: int) -> None:
    x, residual, weight = strided_rows(rows, hidden), torch.randn(rows, hidden), torch.rand(hidden) + 0.5
    close(native.rmsnorm(x, weight, 1e-6, threads), torch_ops.rmsnorm(x, weight, 1e-6))
    normed, summed = native.add_rmsnorm(x, residual, weight, 1e-5, threads)
    expected_normed, expected_summed = torch_ops.add_rmsnorm(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_summed)
    close(normed, expected_normed)


@pytest.mark.parametrize(("hq", "hk", "d", "rot"), [(9, 3, 64, 64), (4, 4, 32, 32), (8, 1, 128, 128), (8, 2, 256, 64)])
@pytest.mark.parametrize(("tokens", "threads"), [(5, 1), (130, 2)])
def test_rope_on_fused_qkv_views_and_separate_tensors(
    native: NativeKernels, hq: int, hk: int, d: int, rot: int, tokens: int, threads: int
) -> None:
    """Whole heads, and partial rotary (Qwen3.5's 64 of 256 dims: a table narrower than the head)."""
    qkv = torch.randn(tokens, (hq + 2 * hk) * d)
    q = qkv[:, : hq * d].view(tokens, hq, d)  # strided views of the fused qkv output, as the graph gives them
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    positions = torch.tensor([0, 1, 17, 300, 511, *range(2, tokens - 3)])
    cos_sin = torch.randn(512, rot)
    before = qkv.clone()
    for q_in, k_in in [(q, k), (q.contiguous(), k.contiguous())]:
        q_rot, k_rot = native.rope(q_in, k_in, positions, cos_sin, threads)
        expected_q, expected_k = torch_ops.rope(q_in, k_in, positions, cos_sin)
        close(q_rot, expected_q)
        close(k_rot, expected_k)
    assert torch.equal(qkv, before), "rotated into new tensors, the input left as it was"


@pytest.mark.parametrize(("tokens", "threads"), [(1, 1), (6, 1), (130, 2)])
def test_head_rmsnorm_on_views_of_a_fused_projection(native: NativeKernels, tokens: int, threads: int) -> None:
    """Qwen3's q/k norms (heads packed in a fused qkv's row, rows its width apart), Qwen3.5's (each query head
    beside its gate), and contiguous heads; the dispatch runs each natively."""
    heads, d = 8, 128
    fused = torch.randn(tokens, heads * 3 * d)
    packed = fused[:, : heads * d].view(tokens, heads, d)
    beside_gates = fused[:, : 2 * heads * d].view(tokens, heads, 2 * d)[:, :, :d]
    weight = torch.rand(d) + 0.5
    for x in (packed, packed.contiguous(), beside_gates):
        expected = torch_ops.head_rmsnorm(x, weight, 1e-6)
        close(native.head_rmsnorm(x, weight, 1e-6, threads), expected)
        assert torch.equal(NativeDispatch(native).head_rmsnorm(x, weight, 1e-6), native.head_rmsnorm(x, weight, 1e-6))


@pytest.mark.parametrize(("tokens", "threads"), [(1, 1), (6, 1), (130, 2)])
def test_gated_rmsnorm_on_a_view_of_the_fused_projection(native: NativeKernels, tokens: int, threads: int) -> None:
    heads, d = 16, 128
    x, fused = torch.randn(tokens, heads * d), torch.randn(tokens, 3 * heads * d) * 4  # silu's tails too
    z = fused[:, heads * d : 2 * heads * d]
    weight = torch.rand(d) + 0.5
    close(native.gated_rmsnorm(x, z, weight, 1e-6, threads), gated_rmsnorm(x, z, weight, 1e-6))


@pytest.mark.parametrize(("rows", "threads"), [(1, 1), (7, 1), (257, 2)])
@pytest.mark.parametrize("inter", [1536, 1539])  # 1539: a tail past the last whole vector
def test_silu_mul(native: NativeKernels, rows: int, threads: int, inter: int) -> None:
    x = strided_rows(rows, 2 * inter) * 4  # gate values far into both tails of the sigmoid
    x[0, 1] = x[0, inter - 1] = float("nan")  # in a vector's lanes and (at 1539) in the tail: NaN out, as torch's
    torch.testing.assert_close(native.silu_mul(x, threads), torch_ops.silu_mul(x), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("n", [1024, 1027])
def test_sigmoid_on_a_view(native: NativeKernels, n: int) -> None:
    """Qwen3.5's attention output gate, vector lanes and a tail; the tails of the curve saturate to 0 and 1."""
    x = strided_rows(5, n) * 30
    close(native.sigmoid(x, 2), torch.sigmoid(x))


def decode_batch(paged_sequences: type, hq: int, hk: int, d: int, prompt_lens: list[int], block_size: int = 16):
    """Sequences prefilled to `prompt_lens` tokens in a paged cache, then one decode step's q, k, v and metadata."""
    seqs = paged_sequences(hq, hk, d, block_size=block_size, seed=len(prompt_lens))
    names = [f"s{i}" for i in range(len(prompt_lens))]
    q, k, v, meta, _ = seqs.step([], list(zip(names, prompt_lens)))
    torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    q, k, v, meta, owners = seqs.step(names, [])
    return seqs, q, k, v, meta, owners


@pytest.mark.parametrize(
    ("hq", "hk", "d", "prompt_lens"),
    [
        (9, 3, 64, [255]),  # SmolLM2's heads; 256 cached tokens, 8 chunks of 32 keys
        (9, 3, 64, [0, 15, 16, 31, 100]),  # contexts 1, 16 (one whole block), 17, 32 (one chunk) and 101
        (9, 3, 64, [20]),  # one stream of one chunk: with two threads, one share of its keys is empty
        (8, 1, 128, [40, 3]),  # multi-query, the other specialised head size
        (4, 2, 24, [70, 33]),  # a head size without a specialised loop
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_decode_attention(
    native: NativeKernels, paged_sequences: type, hq: int, hk: int, d: int, prompt_lens: list[int], threads: int
) -> None:
    seqs, q, k, v, meta, owners = decode_batch(paged_sequences, hq, hk, d, prompt_lens)
    native.write_kv(k, v, seqs.cache, meta.slot_mapping)
    assert torch.equal(seqs.cache.k.flatten(0, 1)[meta.slot_mapping], k)
    assert torch.equal(seqs.cache.v.flatten(0, 1)[meta.slot_mapping], v)
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    spec = AttentionSpec(d**-0.5)
    out = native.paged_decode_attention(q, seqs.cache, tables, lens, spec, threads)
    close(out, seqs.reference(q, owners, d**-0.5))
    close(out, torch_ops.paged_decode_attention(q, seqs.cache, tables, lens, spec))


@pytest.mark.parametrize(
    ("hq", "hk", "d", "chunks"),
    [
        (9, 3, 64, [37, 9, 100, 1]),  # SmolLM2's heads: a fresh prompt, then chunks on top of its cached tokens
        (9, 3, 64, [256]),  # a whole W1 prompt: 8 chunks of 32 keys, 3 tiles of 16 rows
        (8, 1, 128, [5, 70]),  # multi-query, groups of 8 query heads: 6-row tiles
        (32, 1, 16, [3, 40]),  # 32 query heads on one kv head: one row per tile; the smallest head size
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_prefill_attention(
    native: NativeKernels, paged_sequences: type, hq: int, hk: int, d: int, chunks: list[int], threads: int
) -> None:
    seqs = paged_sequences(hq, hk, d)
    for n in chunks:
        q, k, v, meta, owners = seqs.step([], [("a", n)])
        native.write_kv(k, v, seqs.cache, meta.slot_mapping)
        chunk = meta.prefills[0]
        q = torch.cat([q, torch.randn(n, 1, d)], 1)[:, :hq]  # heads packed in rows of a wider tensor
        out = native.paged_prefill_attention(
            q, seqs.cache, chunk.block_table, chunk.context_len, AttentionSpec(d**-0.5), threads
        )
        close(out, seqs.reference(q, owners, d**-0.5))


def test_shapes_that_do_not_fit_raise_instead_of_reading_out_of_bounds(native: NativeKernels) -> None:
    with pytest.raises(NativeShapeError, match=r"linear weight and bias of shape \(8, 32\) does not fit \(1, 64\)"):
        native.linear(torch.randn(1, 64), torch.randn(8, 32), None)
    with pytest.raises(NativeShapeError, match="add_rmsnorm residual"):
        native.add_rmsnorm(torch.randn(2, 8), torch.randn(1, 8), torch.rand(8), 1e-6)
    cache = PagedKv(torch.zeros(4, 16, 2, 32), torch.zeros(4, 16, 2, 32))
    with pytest.raises(NativeShapeError, match="caches"):  # head size 64 against a cache of 32
        native.paged_decode_attention(
            torch.randn(1, 4, 64),
            cache,
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
            AttentionSpec(1.0),
        )


@pytest.fixture
def dispatch(native: NativeKernels) -> NativeDispatch:
    return NativeDispatch(native)


def test_the_cpu_kernel_table_uses_the_native_ops(dispatch: NativeDispatch) -> None:
    ops = CpuBackend().kernels()
    torch_only = torch_ops.TORCH_KERNELS
    for name, kernel in dispatch.kernels(torch_only).items():
        if kernel is torch_only.get(name):
            continue  # an op the C code does not replace
        if name == "attention":  # the torch attention with the native parts bound in
            assert ops[name].func is torch_ops.attention, name
            assert ops[name].keywords["decode"].__func__ is NativeDispatch.paged_decode_attention
            assert ops[name].keywords["write"].__func__ is NativeDispatch.write_kv
        else:
            assert getattr(ops[name], "__func__", None) is getattr(NativeDispatch, name), name


def test_the_kernel_table_is_torch_only_when_native_kernels_are_turned_off(monkeypatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "0")
    backend = CpuBackend()
    ops = backend.kernels()
    assert ops["rmsnorm"] is torch_ops.rmsnorm and ops["rope"] is torch_ops.rope and ops["linear"] is linear
    wide = torch.randn(3072, 64)  # gate_up-sized: one row reads MKL's GEMV on an [in, out] copy instead
    packed = backend.prepare_linear_weight(wide)
    assert packed.dense is None and packed.rows is not None
    x = torch.randn(1, 64)
    close(ops["linear"](x, packed), x.double() @ wide.double().T, atol=1e-4)


def test_dispatch_shares_prefill_sized_rows_among_threads(dispatch: NativeDispatch) -> None:
    rows = NATIVE_SERIAL_ROWS * 4
    x, residual, weight = strided_rows(rows, 576), torch.randn(rows, 576), torch.rand(576) + 0.5
    normed, summed = dispatch.add_rmsnorm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = torch_ops.add_rmsnorm(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_summed)
    close(normed, expected_normed)
    gate_up = strided_rows(rows, 2 * 1536)
    close(dispatch.silu_mul(gate_up), torch_ops.silu_mul(gate_up))


def test_dispatch_falls_back_to_torch_for_what_the_c_code_does_not_take(dispatch: NativeDispatch) -> None:
    weight = torch.rand(64)
    wide = torch.randn(2, 64, dtype=torch.float64)
    assert dispatch.rmsnorm(wide, weight.double(), 1e-6).dtype == torch.float64  # not fp32: torch's op
    assert dispatch.silu_mul(wide).dtype == torch.float64


@pytest.mark.parametrize(("hq", "hk", "d"), [(9, 3, 64), (4, 2, 12)], ids=["native", "head-size-12-torch"])
def test_dispatched_attention_over_mixed_and_decode_only_steps(
    dispatch: NativeDispatch, paged_sequences: type, hq: int, hk: int, d: int
) -> None:
    seqs = paged_sequences(hq, hk, d, block_size=4)
    schedule = [
        ([], [("a", 37), ("b", 9)]),
        (["a", "b"], []),  # decode-only: native write and attention
        (["a", "b"], [("c", 6)]),  # mixed: native prefill chunk and decode half
        (["a", "b", "c"], []),
        (["b"], [("a", 3)]),
    ]
    for decodes, prefills in schedule:
        q, k, v, meta, owners = seqs.step(decodes, prefills)
        out = dispatch.attention(q, k, v, seqs.cache, meta, AttentionSpec(d**-0.5))
        close(out, seqs.reference(q, owners, d**-0.5))
        assert torch.equal(seqs.cache.k.flatten(0, 1)[meta.slot_mapping], k)


@pytest.mark.slow
def test_a_failed_build_is_an_error_naming_the_compiler_output(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("void f(void) { this is not C }\n")
    monkeypatch.setattr(build, "SOURCES", (broken,))  # alone: the real sources would compile first, for a minute
    with pytest.raises(NativeBuildError, match=r"failed on .*broken\.c \(exit \d+\): .*error"):
        build.build(tmp_path / "kernels")
    assert not list((tmp_path / "kernels").glob("*.so*")), "no partial library is left behind"


@pytest.mark.slow
def test_processes_building_at_once_compile_once(tmp_path, monkeypatch) -> None:
    """The workers of a pipeline load the kernels at once: one compiles, the others wait and load its library."""
    source = tmp_path / "one.c"
    source.write_text("int one(void) { return 1; }\n")
    script = (
        "import sys; from pathlib import Path; from sagellm.backends.native import build; "
        f"build.SOURCES = (Path({str(source)!r}),); print(build.build(Path(sys.argv[1])))"
    )
    compilers = tmp_path / "bin"
    compilers.mkdir()
    log = tmp_path / "compiles"
    gcc = compilers / "gcc"  # the real compiler, counting its compiles (a build also links)
    gcc.write_text(
        f'#!/bin/sh\ncase " $* " in *" -c "*) echo x >> {log};; esac\nsleep 1\nexec {shutil.which("gcc")} "$@"\n'
    )
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{compilers}:{os.environ['PATH']}")
    command = [sys.executable, "-c", script, str(tmp_path / "kernels")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {run.communicate(timeout=120)[0].split()[-1] for run in runs}  # its last line (a log line may precede)
    assert all(run.returncode == 0 for run in runs) and len(paths) == 1 and Path(paths.pop()).exists()
    assert log.read_text().count("x") == 1, "one compile for three processes"


def test_without_a_compiler_the_build_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NativeBuildError, match="no C compiler"):
        build.build(tmp_path / "kernels")


def test_an_unavailable_library_is_logged_once_and_the_backend_runs_torch_ops(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SAGELLM_HOME", str(tmp_path / "home"))  # nothing cached there: it must build, and cannot
    monkeypatch.delenv("SAGELLM_KERNELS_DIR")
    build._build_and_load.cache_clear()
    try:
        with structlog.testing.capture_logs() as logs:
            first, second = CpuBackend().kernels(), CpuBackend().kernels()
    finally:
        build._build_and_load.cache_clear()  # the next user builds (or finds) the real library again
    assert first["silu_mul"] is torch_ops.silu_mul and second["silu_mul"] is torch_ops.silu_mul
    events = [e for e in logs if e["event"] == "native_kernels_unavailable"]
    assert len(events) == 1 and "no C compiler" in events[0]["reason"]


@pytest.fixture(scope="module")
def built_here(tmp_path_factory) -> tuple:
    """A fresh folder with the library of the variant this CPU runs built in it (once for the module's tests)."""
    folder = tmp_path_factory.mktemp("native")
    return folder, build.build(folder)


@pytest.mark.slow
def test_the_library_is_built_once_per_source_and_instruction_set(built_here) -> None:
    tmp_path, first = built_here
    key = build.library_key(build.SOURCES + build.HEADERS, isa.chosen())  # a header's change rebuilds too
    assert first.name == f"sagellm_kernels-{isa.chosen().name}-{key}.so" == build.library_name(isa.chosen())
    assert first.stat().st_mode & 0o044 == 0o044, "readable by the other users of a shared cache"
    modified = first.stat().st_mtime_ns
    assert build.build(tmp_path) == first and first.stat().st_mtime_ns == modified
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == [first.name]  # the build's lock stays
    build.load(first)  # declares every prototype, so every function the wrappers call is exported


GREEDY = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2], ids=["llama", "qwen2"])
def test_engine_greedy_tokens_are_the_same_with_and_without_native_kernels(make, tmp_path, monkeypatch) -> None:
    path = make(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (1, 9, 22, 40)]

    def generate() -> dict[str, list[int]]:
        # Block size 4 and a budget of 16 tokens: contexts span many blocks, prefills are chunked next to decodes,
        # and the later prompts join a running batch.
        engine = LLMEngine(
            EngineConfig(model=str(path), backend="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
        )
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, GREEDY)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids_delta)
        return tokens

    with_native = generate()
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert with_native == generate()
    assert all(len(t) == GREEDY.max_tokens for t in with_native.values())


@pytest.mark.slow
@pytest.mark.parametrize("variant", isa.variants(), ids=lambda v: v.name)
def test_every_variant_compiles_and_the_cpu_loads_only_what_it_runs(variant, tmp_path, built_here, monkeypatch) -> None:
    """The variants this CPU cannot run are at least compile-checked; the chosen one is the best it can."""
    _, chosen = built_here  # the variant this CPU runs, built once already
    # Unoptimised: the check is of the sources against the variant's instructions (an intrinsic the flags lack fails
    # at -O0 too), and the optimiser is most of a build's time.
    monkeypatch.setattr(build, "CFLAGS", tuple("-O0" if flag == "-O3" else flag for flag in build.CFLAGS))
    assert (chosen if variant == isa.chosen() else build.build(tmp_path, variant)).exists()
    assert isa.chosen() == isa.runnable()[0] and (variant in isa.runnable()) == (variant.requires <= isa.cpu_flags())


def test_an_isa_asked_for_is_loaded_and_one_the_cpu_lacks_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(isa.ISA_ENV, "portable")
    assert isa.chosen().name == "portable"
    monkeypatch.setenv(isa.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="no such kernel variant"):
        isa.chosen()
    lacking = next((v for v in isa.variants() if v not in isa.runnable()), None)
    if lacking is not None:
        monkeypatch.setenv(isa.ISA_ENV, lacking.name)
        with pytest.raises(ValueError, match="this CPU lacks"):
            isa.chosen()
