"""The decoder layers as one native call (backends/native/decoder_layers.c, fused by
runtime/execution_graph/fuse_layers.py): bit-identical to the op-by-op path it replaces at decode, on every
instruction-set variant this CPU runs, with and without qkv biases, on the blocks of every kept kind (Q4_1, Q8_0,
Q5_0, the K-quants and MXFP4), for Llama-shaped layers, Qwen3's normed heads, Qwen3.5's mix of Gated DeltaNet and
gated attention, and mixtures of experts (gpt-oss with its sinks and alternating window, Mixtral); declined (the ops
run one by one) for prefill, for more rows than the block linears take, and where weights have no blocks."""

from __future__ import annotations

import msgspec
import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.backends.cpu_linear import CpuLinearWeight
from sagellm.backends.native import DISABLE_ENV
from sagellm.backends.native.isa import ISA_ENV, runnable
from sagellm.backends.registry import get_backend
from sagellm.benchmarks import kquant_pack
from sagellm.runtime.engine.model_runner import ModelRunner
from sagellm.runtime.execution_graph.fuse_layers import FusedLayers
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.tensor_parallel import TensorShard
from tests import tiny_models
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2, make_tiny_qwen3_5, write_tiny_gguf

K_QTYPES = {"Q5_0": "q8x", "Q4_K": "q4kx", "Q5_K": "q5kx", "Q6_K": "q6kx"}  # the layout each is read in


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """(arch, qtype) -> a tiny GGUF: llama without biases, qwen2 with qkv biases (and tied embeddings), qwen3 with
    per-head q and k norms; gpt-oss and Mixtral's experts; for the
    K-quants (and Q5_0) a llama whose every linear has inputs in whole super-blocks of 256, their sub-block scales
    varied (sagellm.benchmarks.kquant_pack's encoders)."""
    root = tmp_path_factory.mktemp("decoder_layers")
    made = {}
    for arch, make in (("llama", make_tiny_llama), ("qwen2", make_tiny_qwen2), ("qwen3", tiny_models.make_tiny_qwen3)):
        hf_dir = make(root / arch)
        for qtype in ("Q4_1", "Q8_0", "F32"):
            made[arch, qtype] = write_tiny_gguf(root / f"{arch}.{qtype}.gguf", hf_dir, qtype)
    hf_dir = make_tiny_qwen3_5(root / "qwen3_5")  # 2 key heads, 4 value heads: stored tiled by key head
    for qtype in ("Q4_1", "Q8_0"):
        made["qwen3_5", qtype] = write_tiny_gguf(root / f"qwen3_5.{qtype}.gguf", hf_dir, qtype)
    hf_dir = tiny_models.make_tiny_gpt_oss(root / "gpt_oss")  # sinks, a window every other layer, biases
    made["gpt_oss", "MXFP4"] = write_tiny_gguf(root / "gpt_oss.gguf", hf_dir, "MXFP4", beside_experts="Q8_0")
    hf_dir = tiny_models.make_tiny_mixtral(root / "mixtral")
    made["mixtral", "Q8_0"] = write_tiny_gguf(root / "mixtral.gguf", hf_dir, "Q8_0")
    hf_dir = make_tiny_llama(root / "llama_k", hidden_size=256, intermediate_size=512)  # 4 heads of 64
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_models, "quantize", kquant_pack.quantize)
        for qtype in (*K_QTYPES, "Q4_K_M"):
            made["llama", qtype] = write_tiny_gguf(root / f"llama.{qtype}.gguf", hf_dir, qtype)
    return made


def fused_of(llm: LLM) -> FusedLayers | None:
    return next((i.kernel for i in llm.engine.runner.plan.instrs if isinstance(i.kernel, FusedLayers)), None)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (count,), generator=g)]


def generate(llm: LLM, batch: list[list[int]], max_tokens: int) -> list:
    """Tokens and logprobs (top 5), every bit of them."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=5)
    outs = llm.generate(batch, params)
    return [(o.outputs[0].token_ids, msgspec.to_builtins(o.outputs[0].logprobs)) for o in outs]


def block_layouts(fused: FusedLayers) -> set[str]:
    """The layouts of the fused layers' linears (their op-by-op fallback holds the same packed weights)."""
    weights = (c for instr in fused.fallback.instrs for c in instr.consts if isinstance(c, CpuLinearWeight))
    return {w.blocks.layout for w in weights if w.blocks is not None}


def fused_and_op_by_op(path, batch: list[list[int]], max_tokens: int, layouts: set[str] | None = None, **engine):
    """The outputs of `batch` with the fused layers, then with their own ops (the kernel declining every step),
    and per step of the first: (rows, decode-only, taken by the fused kernel). `layouts`: the block layouts the
    fused layers must read; `engine`: more of EngineConfig."""
    llm = LLM(str(path), backend="cpu", block_size=4, num_kv_blocks=512, max_num_seqs=64, enable_prefix_caching=False,
              **engine)  # fmt: skip
    try:
        fused = fused_of(llm)
        assert fused is not None, "every linear has its blocks, so the layers are fused"
        runs = [i for i in llm.engine.runner.plan.instrs if isinstance(i.kernel, FusedLayers)]
        assert len(runs) == 1 and len(fused.fallback.instrs) >= len(llm.engine.runner.plan.instrs), "one run"
        assert layouts is None or block_layouts(fused) == layouts
        native, taken = fused.kernel, []

        def counted(hidden, residual, positions, meta, lora_rows):
            out = native(hidden, residual, positions, meta, lora_rows)
            taken.append((hidden.shape[0], meta.num_decode_tokens == hidden.shape[0], out is not None))
            return out

        fused.kernel = counted
        with_fused = generate(llm, batch, max_tokens)
        fused.kernel = lambda *args: None
        op_by_op = generate(llm, batch, max_tokens)
        return with_fused, op_by_op, taken
    finally:
        llm.engine.close()


@pytest.mark.parametrize("variant", runnable(), ids=lambda v: v.name)
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_layers_are_bit_identical_to_op_by_op(tiny_ggufs, monkeypatch, arch, qtype, variant):
    monkeypatch.setenv(ISA_ENV, variant.name)  # the library of this variant, and its group width of blocks
    with_fused, op_by_op, taken = fused_and_op_by_op(tiny_ggufs[arch, qtype], prompts(7), 12)
    assert [fused for _, decode_only, fused in taken if decode_only] == [True] * 11  # 12 tokens: 1 prefilled
    assert not any(fused for _, decode_only, fused in taken if not decode_only)
    assert with_fused == op_by_op


@pytest.mark.parametrize("variant", runnable(), ids=lambda v: v.name)
@pytest.mark.parametrize(
    ("arch", "qtype", "layouts"),
    [("qwen2", "Q4_1", ("q4cx",)), ("llama", "Q4_K_M", ("q4kx", "q6cx")), ("llama", "Q5_K", ("q5kx",))],
)
def test_fused_layers_round_x_to_int8_as_their_ops_do(tiny_ggufs, monkeypatch, variant, arch, qtype, layouts):
    """--int8-activations: the linears' kernels on x rounded (block_q8.c) in the fused call as op by op."""
    monkeypatch.setenv(ISA_ENV, variant.name)
    width = "16" if variant.name.startswith("avx512") else "8"
    path = tiny_ggufs[arch, qtype]
    with_fused, op_by_op, taken = fused_and_op_by_op(
        path, prompts(7), 12, {f"{layout}{width}" for layout in layouts}, int8_activations=True
    )
    assert [fused for _, decode_only, fused in taken if decode_only] == [True] * 11
    assert with_fused == op_by_op
    exact, _, _ = fused_and_op_by_op(path, prompts(7), 12)
    assert exact != with_fused, "x was rounded: the logprobs differ from the exact linears'"


@pytest.mark.parametrize("variant", runnable(), ids=lambda v: v.name)
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_qwen3_5s_hybrid_layers_fuse_bit_identically(tiny_ggufs, monkeypatch, qtype, variant):
    """Gated DeltaNet layers (their states advanced in the fused call) and gated attention layers (per-head norms,
    partial rotary, the sigmoid gate) in one run: the same tokens and logprobs as their ops one by one, each step
    from the states the last one left (prompts of one token included: their states start from zeros)."""
    monkeypatch.setenv(ISA_ENV, variant.name)
    batch = [[5], *prompts(6, seed=2)]
    with_fused, op_by_op, taken = fused_and_op_by_op(tiny_ggufs["qwen3_5", qtype], batch, 12)
    assert [fused for _, decode_only, fused in taken if decode_only] == [True] * 11
    assert with_fused == op_by_op


@pytest.mark.parametrize("variant", runnable(), ids=lambda v: v.name)
@pytest.mark.parametrize(("arch", "qtype"), [("gpt_oss", "MXFP4"), ("mixtral", "Q8_0")])
def test_mixtures_of_experts_fuse_bit_identically(tiny_ggufs, monkeypatch, arch, qtype, variant):
    """gpt-oss as llama.cpp ships it (MXFP4 experts with biases and clamped SwiGLU, Q8_0 attention with sinks and a
    sliding window every other layer) and Mixtral (Q8_0, SiLU): every layer in one run, the experts routed and run
    in the fused call; the same tokens and logprobs as the ops one by one, on prompts longer than the window."""
    monkeypatch.setenv(ISA_ENV, variant.name)
    with_fused, op_by_op, taken = fused_and_op_by_op(tiny_ggufs[arch, qtype], prompts(7, seed=3), 12)
    assert [fused for _, decode_only, fused in taken if decode_only] == [True] * 11
    assert with_fused == op_by_op


@pytest.mark.parametrize("variant", runnable(), ids=lambda v: v.name)
@pytest.mark.parametrize("qtype", list(K_QTYPES))
def test_fused_layers_read_q5_0_and_the_k_quants_bit_identically(tiny_ggufs, monkeypatch, qtype, variant):
    monkeypatch.setenv(ISA_ENV, variant.name)
    layout = K_QTYPES[qtype] + ("16" if variant.name.startswith("avx512") else "8")
    with_fused, op_by_op, taken = fused_and_op_by_op(tiny_ggufs["llama", qtype], prompts(5), 8, {layout})
    assert [fused for _, decode_only, fused in taken if decode_only] == [True] * 7
    assert with_fused == op_by_op


def test_fused_layers_read_a_q4_k_m_files_linears_of_mixed_kinds_bit_identically(tiny_ggufs):
    """Q4_K_M: q/k Q4_K beside a Q6_K v, so the fused qkv is read as parts, and layers differ in their down's kind."""
    with_fused, op_by_op, taken = fused_and_op_by_op(tiny_ggufs["llama", "Q4_K_M"], prompts(5), 8)
    assert [fused for _, decode_only, fused in taken if decode_only] == [True] * 7
    assert with_fused == op_by_op


def test_more_rows_than_the_block_linears_take_run_op_by_op(tiny_ggufs):
    """52 sequences decoding at once: above NATIVE_BLOCK_ROWS the kernel declines, and the outputs are the same."""
    with_fused, op_by_op, taken = fused_and_op_by_op(tiny_ggufs["llama", "Q4_1"], prompts(52, seed=1), 4)
    assert with_fused == op_by_op
    assert any(rows == 52 and decode_only and not fused for rows, decode_only, fused in taken)


def test_the_plan_keeps_its_head_and_fuses_only_what_has_blocks(tiny_ggufs, monkeypatch):
    llm = LLM(str(tiny_ggufs["llama", "Q4_1"]), backend="cpu", block_size=4, num_kv_blocks=64)
    ops = [
        i.node.split("_")[0] if not isinstance(i.kernel, FusedLayers) else "fused"
        for i in llm.engine.runner.plan.instrs
    ]
    assert ops == ["embedding", "fused", "index", "index", "add", "linear"]  # the head reads the fused outputs
    assert len(fused_of(llm).fallback.instrs) == 10 * llm.engine.runner.config.num_layers
    llm.engine.close()
    dense = LLM(str(tiny_ggufs["llama", "F32"]), backend="cpu", block_size=4, num_kv_blocks=64)
    assert fused_of(dense) is None, "no GGUF blocks: the layers' linears run on oneDNN, op by op"
    dense.engine.close()
    monkeypatch.setenv(DISABLE_ENV, "0")
    torch_ops = LLM(str(tiny_ggufs["llama", "Q4_1"]), backend="cpu", block_size=4, num_kv_blocks=64)
    assert fused_of(torch_ops) is None, "without the native kernels there is nothing to fuse into"
    torch_ops.engine.close()


class NoCollectives:
    """Binding a tensor parallel rank's graph only looks these up; nothing here calls them."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("not called")

    def all_gather(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        raise AssertionError("not called")


def test_a_tensor_parallel_rank_keeps_its_ops(tiny_ggufs):
    """An all-reduce sits between a rank's o_proj and its norm: not a whole layer, so nothing is fused."""
    loaded = load_model(tiny_ggufs["llama", "Q4_1"], load_tokenizer=False)
    runner = ModelRunner(
        loaded.config,
        loaded.weights,
        get_backend("cpu"),
        num_blocks=16,
        block_size=4,
        max_model_len=64,
        quantized=loaded.quantized,
        shard=TensorShard(0, 2),
        collectives=NoCollectives(),
    )
    assert not any(isinstance(i.kernel, FusedLayers) for i in runner.plan.instrs)
    assert sum(i.node.startswith("all_reduce") for i in runner.plan.instrs) == 2 * loaded.config.num_layers
