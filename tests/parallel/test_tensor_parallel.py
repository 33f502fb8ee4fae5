"""Tensor parallel engines against the oracle: TP=2 (rank 0 here, rank 1 a real process, gloo between them) gives
transformers' logits within fp32 tolerance and its greedy tokens exactly, on tiny random Llama (heads split unevenly,
3 KV heads over 2 ranks), Qwen2 (q/k/v biases, tied embeddings) and Gemma 3 (q/k and sandwich norms, sliding layers
with their own rope, soft-capped logits gathered from the ranks' vocabulary shares) models and on SmolLM2-135M (9
query heads, 3 KV heads, its GGUF's quantized blocks cut per rank), the same tokens as TP=1 through a continuous
batch; a rank that dies fails the next step with `RunnerLostError`, and a size the model cannot split is refused with
the reason."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.model_runner import RunnerLostError
from sagellm.runtime.parallel.engine import start_engine
from tests.oracle import assert_last_logits_match, hf_greedy, random_prompts
from tests.tiny_models import make_tiny_gemma3, make_tiny_llama, make_tiny_qwen2

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
UNEVEN = {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96, "intermediate_size": 200}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny(request, tmp_path_factory):
    make = {"llama": functools.partial(make_tiny_llama, **UNEVEN), "qwen2": make_tiny_qwen2, "gemma3": make_tiny_gemma3}
    path = make[request.param](tmp_path_factory.mktemp(request.param) / request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return path, hf


@pytest.fixture(scope="module")
def tp2(tiny):
    engine = start_engine(
        EngineConfig(model=str(tiny[0]), backend="cpu", block_size=4, num_kv_blocks=64, tensor_parallel_size=2)
    )
    yield engine
    engine.close()


def test_tp2_prefill_logits_match_transformers(tiny, tp2):
    _, hf = tiny
    batch_prompts = random_prompts(hf.config.vocab_size, [1, 7, 16, 23])
    assert_last_logits_match(tp2, hf, batch_prompts)


def test_tp2_greedy_tokens_equal_transformers_in_a_continuous_batch(tiny, tp2):
    _, hf = tiny
    batch_prompts = random_prompts(hf.config.vocab_size, [5, 12, 30])
    for i, p in enumerate(batch_prompts):
        tp2.add_request(f"greedy-{i}", p, GREEDY)
    finished = {}
    while tp2.has_unfinished_requests():
        finished.update({o.request_id: o.outputs[0].token_ids for o in tp2.step() if o.finished})
    for i, p in enumerate(batch_prompts):
        assert finished[f"greedy-{i}"] == hf_greedy(hf, p, GREEDY.max_tokens)


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2)])
def test_a_prompts_kv_moves_between_tp2_and_tp1_engines_and_decodes_as_transformers(tiny, prefill_tp, decode_tp):
    """A prefill/decode hand-over with a split cache on one side: the KV leaves whole (both ranks' heads joined) and
    arrives whole (each rank keeps its heads)."""
    path, hf = tiny
    made = [
        start_engine(
            EngineConfig(model=str(path), backend="cpu", block_size=4, num_kv_blocks=64, tensor_parallel_size=tp)
        )
        for tp in (prefill_tp, decode_tp)
    ]
    prefill, decode = made
    try:
        batch_prompts = random_prompts(hf.config.vocab_size, [9, 17])
        for i, p in enumerate(batch_prompts):
            prefill.add_request(f"pd-{i}", p, GREEDY, prefill_only=True)
        handed = []
        while prefill.has_unfinished_requests():
            handed += [o for o in prefill.step() if o.finished]
        tokens = {}
        for o in handed:
            assert o.kv.shape[3] == hf.config.num_key_value_heads  # every head, whichever side is split
            first = o.outputs[0].token_ids[0]
            decode.add_prefilled_request(o.request_id, o.prompt_token_ids, GREEDY, first, o.kv)
            tokens[o.request_id] = [first]
        while decode.has_unfinished_requests():
            for out in decode.step():
                tokens[out.request_id] += out.outputs[0].token_ids_delta
        for i, p in enumerate(batch_prompts):
            assert tokens[f"pd-{i}"] == hf_greedy(hf, p, GREEDY.max_tokens)
    finally:
        for engine in made:
            engine.close()


def test_a_lost_rank_fails_the_next_step_not_a_request(tiny):
    engine = start_engine(EngineConfig(model=str(tiny[0]), backend="cpu", num_kv_blocks=32, tensor_parallel_size=2))
    try:
        (rank1,) = engine.runner.ranks
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.wait()
        engine.add_request("after", [5, 6, 7], GREEDY)
        with pytest.raises(RunnerLostError, match="a rank of the engine is gone"):
            engine.step()
    finally:
        engine.close()


def test_a_size_the_model_cannot_split_is_refused_before_any_rank_starts(tiny):
    path, hf = tiny
    kv_heads = hf.config.num_key_value_heads
    with pytest.raises(ValueError, match=f"more than the model's {kv_heads} KV heads"):
        start_engine(EngineConfig(model=str(path), backend="cpu", num_kv_blocks=32, tensor_parallel_size=kv_heads + 1))


@pytest.mark.network
@pytest.mark.slow
def test_smollm2_tp2_greedy_equals_tp1(smollm2_dir: Path):
    """9 query heads and 3 KV heads over 2 ranks (6 + 3, 2 + 1), Q8_0 blocks cut by rows and by inputs."""
    chats = [[{"role": "user", "content": c}] for c in ("What is the capital of France?", "Write a haiku about rain.")]
    texts = {}
    for tp in (1, 2):
        llm = LLM(str(smollm2_dir), backend="cpu", tensor_parallel_size=tp)
        try:
            texts[tp] = [o.outputs[0].token_ids for o in llm.chat(chats, SamplingParams(max_tokens=24, temperature=0))]
        finally:
            llm.engine.close()
    assert texts[2] == texts[1]


@pytest.mark.slow
def test_graph_file_engine_nodes_with_tp_and_pp_print_the_one_process_text(tmp_path):
    """`tp: 2` and `pp: 2` on an engine node in a worker process (`placement: process`): `sagellm run` end to end."""
    path = make_tiny_llama(tmp_path / "llama", **UNEVEN)
    printed = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        graph = tmp_path / f"tp{tp}pp{pp}.yaml"
        graph.write_text(TP_GRAPH.format(model=path, tp=tp, pp=pp))
        command = [sys.executable, "-m", "sagellm.cli.main", "run", str(graph), "--prompt", "hello there",
                   "--prompt", "the rain", "--max-tokens", "12", "--temperature", "0"]  # fmt: skip
        ran = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "SAGELLM_HOME": str(tmp_path)}
        )
        assert ran.returncode == 0, ran.stderr
        printed[tp, pp] = ran.stdout
    assert printed[2, 1] == printed[1, 1] == printed[1, 2] and printed[1, 1].strip()


TP_GRAPH = """
name: tp
model: {model}
nodes:
  source: {{op: prompt_source}}
  admission: {{op: admission}}
  engine: {{op: engine, placement: process, params: {{tp: {tp}, pp: {pp}, block_size: 4, num_kv_blocks: 64}}}}
  stdout: {{op: stdout_sink}}
edges:
  - source -> admission -> engine -> stdout
"""
