"""Each architecture the graph builder knows beyond the Llama layer, against the oracle on tiny random weights:
Qwen3 (q/k norms), Qwen3-MoE (its experts, weights renormalized or not), Mistral (every layer sliding), Gemma 2
(GeGLU, sandwich norms, soft-capped scores and logits, alternate layers sliding), Gemma 3 (q/k norms, two rope
tables, two sliding layers of every three; also as it ships, multimodal), Gemma 4 (per-layer embeddings, the last
layers sharing earlier layers' KV, full attention layers with their own head size and values from their keys,
proportional rope, layer scalars; and its mixture, experts beside each MLP), Gemma 3n (AltUp streams, LAuReL,
activation sparsity, MLP widths per layer, a per-layer table shorter than the vocabulary), Phi-3 (fused
projections, partial rotary, LongRoPE), gpt-oss (attention sinks, biases everywhere, YaRN, experts stacked with
biases and the clamped SwiGLU), Qwen3.5 (Gated DeltaNet layers and their recurrent states, gated attention; its
prefix hit restores the states' checkpoint), Qwen3.5-MoE (its experts and a gated shared expert) and Qwen3-Next (its
DeltaNet projections fused per key head). For each: transformers' logits for a batch, its greedy tokens for 16
prompts over 32 tokens in one continuous batch (whole and chunked prefill), alone, after a prefix-cache hit, from
the GGUF file llama.cpp's converter would write, and through graphs/pd.yaml (prefill and decode in two processes);
seeded sampling draws the same alone and in a chunked batch.

Prompts run past the 8-position windows, so the windows really cut what a query sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.window_blocks import WindowedBlocks
from sagellm.runtime.executor.run import run_pipeline
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests import tiny_models
from tests.oracle import ENGINE_BACKEND, assert_last_logits_match, hf_greedy, random_prompts
from tests.tiny_vision_models import make_tiny_gemma3_vision

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
TOKENS = 32  # past every prompt and window: the issue asks 16 or more
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
# Phi-3's LongRoPE takes its short factors for an engine of at most its original 32 positions (and long beyond):
# the tiny Phi-3 serves 96 positions, so prompts and outputs stay past 32 from the first token, where transformers
# takes the long factors too.
LENGTHS = [5, 30, 17, 9, 1, 24, 12, 3, 20, 11, 28, 7, 15, 2, 26, 19]  # 16 prompts, most past the 8-token windows
ARCHITECTURES = {
    "qwen3": dict(lengths=LENGTHS),
    "qwen3_moe": dict(lengths=LENGTHS),
    "mistral": dict(lengths=LENGTHS),
    "gemma2": dict(lengths=LENGTHS),
    "gemma3": dict(lengths=LENGTHS),
    "gemma4": dict(lengths=LENGTHS),
    "gemma4_moe": dict(lengths=LENGTHS),
    "gemma3n": dict(lengths=LENGTHS),
    "phi3": dict(lengths=[n + 33 for n in LENGTHS], max_model_len=128),
    "gpt_oss": dict(lengths=LENGTHS),
    "qwen3_5": dict(lengths=LENGTHS),
    "qwen3_5_moe": dict(lengths=LENGTHS),
    "qwen3_next": dict(lengths=LENGTHS),
}
ENGINE = dict(backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=400)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Transformers' models and the in-process engines of this module on one torch thread (the count restored after):
    a tiny model's ops are a few hundred values each, so a second OpenMP thread only adds its wake-ups (4-6x the CPU
    time of one thread on 2 cores, for the same tokens). The PD run's worker processes take their own share anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tiny(request, tmp_path_factory):
    """(HF directory, transformers' model, its prompts and greedy tokens, the engine settings)."""
    name, spec = request.param, ARCHITECTURES[request.param]
    path = getattr(tiny_models, f"make_tiny_{name}")(tmp_path_factory.mktemp(name) / name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = random_prompts(hf.config.vocab_size, spec["lengths"])
    expected = [hf_greedy(hf, p, TOKENS) for p in prompts]
    settings = ENGINE | ({"max_model_len": spec["max_model_len"]} if "max_model_len" in spec else {})
    return path, hf, prompts, expected, settings


def test_the_config_records_the_architectures_features(tiny):
    path, hf, *_ = tiny
    config = load_model(path, load_tokenizer=False, load_weights=False).config
    assert config.num_params() == sum(p.numel() for p in hf.parameters())
    windows = [config.window_of(i) for i in range(config.num_layers)]
    expected = {"qwen3": [0, 0], "qwen3_moe": [0, 0], "mistral": [8, 8], "gemma2": [8, 0, 8, 0],
                "gemma3": [8, 8, 0, 8, 8, 0], "gemma4": [8, 8, 0, 8, 8, 0],
                "gemma4_moe": [8, 0, 8, 0], "gemma3n": [8, 8, 0, 8, 8, 0], "phi3": [0, 0], "gpt_oss": [8, 0, 8, 0],
                "qwen3_5": [0, 0, 0, 0], "qwen3_5_moe": [0, 0, 0, 0], "qwen3_next": [0, 0, 0, 0]}  # fmt: skip
    assert windows == expected[path.name]


def test_prefill_logits_match_transformers(tiny):
    path, hf, prompts, _, settings = tiny
    engine = LLMEngine(EngineConfig(model=str(path), **settings))
    assert_last_logits_match(engine, hf, prompts[:4])


@pytest.mark.parametrize("batched_tokens", [512, 8], ids=["whole", "chunked"])
def test_greedy_tokens_identical_in_a_continuous_batch(tiny, batched_tokens):
    path, _, prompts, expected, settings = tiny
    llm = LLM(str(path), max_num_batched_tokens=batched_tokens, **settings)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected


def test_greedy_tokens_identical_alone_and_after_a_prefix_hit(tiny):
    path, hf, prompts, expected, settings = tiny
    llm = LLM(str(path), **settings)
    assert llm.generate([prompts[1]], GREEDY)[0].outputs[0].token_ids == expected[1]
    again = prompts[1][:-1] + [prompts[1][-1] % (hf.config.vocab_size - 3) + 3]  # the same but for the last token
    out = llm.generate([again], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert out.metrics.num_cached_tokens == (len(again) - 1) // 4 * 4
    assert out.outputs[0].token_ids == hf_greedy(hf, again, 16)


def test_sliding_layers_give_back_the_blocks_before_their_window(tiny):
    """A model mixing sliding and full attention layers keeps the sliding ones' blocks in a group of their own: as a
    sequence runs, those before its window go back to the pool while the full layers' table grows; its tokens stay
    transformers'. The next prompt sharing its prefix finds the window's blocks still cached."""
    path, hf, prompts, expected, settings = tiny
    if path.name not in ("gemma2", "gemma3", "gemma4", "gemma4_moe", "gemma3n", "gpt_oss"):
        pytest.skip("every layer slides, or none does: one group of blocks")
    engine = LLMEngine(EngineConfig(model=str(path), **settings))
    blocks = engine.scheduler.block_manager
    assert isinstance(blocks, WindowedBlocks)
    engine.add_request("long", prompts[1], GREEDY)
    held, tables, tokens = [], [], []
    while engine.has_unfinished_requests():
        for seq in engine.scheduler.running:
            held.append(sum(b != blocks.sliding.null_block for b in seq.window_table))
            tables.append(len(seq.block_table))
        tokens += [t for out in engine.step() for t in out.outputs[0].token_ids_delta]
    assert tokens == expected[1]
    assert max(held) <= 8 // 4 + 2 and max(tables) * 4 >= len(prompts[1]) + TOKENS - 4  # (seen before each step)
    assert blocks.sliding.num_free_blocks == blocks.sliding.num_blocks - 1  # all back but the null block
    again = prompts[1][:-1] + [prompts[1][-1] % (hf.config.vocab_size - 3) + 3]
    engine.add_request("again", again, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    finished = []
    while engine.has_unfinished_requests():
        finished += [out for out in engine.step() if out.finished]
    assert finished[0].metrics.num_cached_tokens == (len(again) - 1) // 4 * 4
    assert finished[0].outputs[0].token_ids == hf_greedy(hf, again, 4)


def test_a_model_whose_every_layer_slides_gives_back_the_blocks_its_window_passed(tiny):
    """Mistral (every layer sliding over 8 positions): its one group of blocks gives back those before the window
    as a sequence runs; tokens transformers', a prefix hit still found, and a hand-over to a decode worker carries
    the window's KV (zeros for the passed positions, which nothing reads)."""
    path, hf, prompts, expected, settings = tiny
    if path.name != "mistral":
        pytest.skip("Mistral's tiny model is the one whose every layer slides")
    engine = LLMEngine(EngineConfig(model=str(path), **settings))
    blocks = engine.scheduler.block_manager
    assert blocks.window == 8 and blocks.null_block == 0
    engine.add_request("long", prompts[1], GREEDY)
    held, tokens = [], []
    while engine.has_unfinished_requests():
        held += [sum(b != blocks.null_block for b in seq.block_table) for seq in engine.scheduler.running]
        tokens += [t for out in engine.step() for t in out.outputs[0].token_ids_delta]
    assert tokens == expected[1] and max(held) <= 8 // 4 + 2
    assert blocks.num_free_blocks == blocks.num_blocks - 1  # all back but the null block
    again = prompts[1][:-1] + [prompts[1][-1] % (hf.config.vocab_size - 3) + 3]
    engine.add_request("again", again, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), prefill_only=True)
    (handed,) = run_until_finished(engine)
    assert handed.metrics.num_cached_tokens == (len(again) - 1) // 4 * 4
    decode = LLMEngine(EngineConfig(model=str(path), **settings))
    first = decode.add_prefilled_request("again", again, GREEDY, handed.outputs[0].token_ids[0], handed.kv)
    tokens = first.outputs[0].token_ids_delta
    while decode.has_unfinished_requests():
        tokens += [t for out in decode.step() for t in out.outputs[0].token_ids_delta]
    assert tokens == hf_greedy(hf, again, TOKENS)


def run_until_finished(engine: LLMEngine) -> list:
    finished = []
    while engine.has_unfinished_requests():
        finished += [out for out in engine.step() if out.finished]
    return finished


def test_seeded_sampling_draws_the_same_alone_and_in_a_chunked_batch(tiny):
    path, _, prompts, _, settings = tiny
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    alone = LLM(str(path), **settings).generate([prompts[1]], seeded)[0].outputs[0].token_ids
    assert len(set(alone)) > 3  # really sampled
    batch = LLM(str(path), max_num_batched_tokens=8, **settings).generate(prompts[:4], [GREEDY, seeded, GREEDY, GREEDY])
    assert batch[1].outputs[0].token_ids == alone


def test_the_gguf_file_decodes_as_transformers(tiny, tmp_path):
    path, _, prompts, expected, settings = tiny
    if "mistral" in path.name:
        pytest.skip("llama.cpp writes Mistral as a llama GGUF with full attention: not transformers' model")
    gguf_path = tiny_models.write_tiny_gguf(tmp_path / "model.gguf", path, "F32")
    outs = LLM(str(gguf_path), **settings).generate(prompts[:3], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected[:3]


@pytest.mark.slow  # two worker processes
def test_pd_yaml_gives_transformers_tokens(tiny):
    """graphs/pd.yaml as shipped, its model and prompts set: prefill in one process, decode in another."""
    path, _, prompts, expected, settings = tiny
    if path.name in ("qwen3_5_moe", "qwen3_next"):  # two more worker processes for nothing PD moves differently
        pytest.skip("Qwen3.5's run covers the hand-over of a hybrid model's KV and states")
    if path.name in ("gemma4_moe", "gemma3n"):
        pytest.skip("Gemma 4's run covers the hand-over of KV of per-layer shapes and shared KV")
    texts = [" ".join(f"w{t}" for t in p[:8]) for p in prompts[:3]]  # text prompts: the pipeline tokenizes them
    source = {"prompts": texts, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "chat": False}
    overrides = {"model": str(path), **{f"source.{k}": v for k, v in source.items()}}
    result = run_pipeline(load_pipeline(GRAPHS / "pd.yaml", overrides=overrides))
    tokens = [result.outcomes[f"req-{i}"].token_ids for i in range(len(texts))]
    alone = LLM(str(path), **settings).generate(texts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert tokens == [o.outputs[0].token_ids for o in alone]
    assert result.operators["pd_split"].decisions["pd"] == len(texts)


def test_qwen3_moe_without_renormalized_expert_weights(tmp_path):
    """norm_topk_prob false (the default of Qwen3MoeConfig): the chosen experts' softmax weights as they are."""
    path = tiny_models.make_tiny_qwen3_moe(tmp_path / "moe", norm_topk_prob=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model=str(path), **ENGINE))
    assert not engine.model.config.normalize_expert_weights
    assert_last_logits_match(engine, hf, random_prompts(hf.config.vocab_size, [7, 19]))


def test_gemma3_as_it_ships_multimodal_serves_its_text_model(tmp_path):
    """Gemma 3 4B and up: Gemma3ForConditionalGeneration, the text config nested and the weights under
    `language_model.`, its vision tower beside (tests/multimodal/test_gemma3_vision.py runs it). Text in,
    transformers' own multimodal model's logits out."""
    path = make_tiny_gemma3_vision(tmp_path / "gemma3mm")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    loaded = load_model(path, load_tokenizer=False)
    assert loaded.config.architecture == "gemma3_text" and loaded.config.vision is not None
    engine = LLMEngine(EngineConfig(model=str(path), **ENGINE))
    prompts = random_prompts(loaded.config.vocab_size, [7, 25])
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    assert_last_logits_match(engine, hf, prompts)
    outs = LLM(str(path), **ENGINE).generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 12) for p in prompts]
