"""Qwen3.5's (Qwen3.5-MoE's, Qwen3-Next's) multi-token prediction head, loaded with the model and run as a graph of
its own: its logits against a reference made of transformers' own decoder layer and norms (transformers runs no MTP
head) on every row of a chunked prefill and a decode over its one layer's cache, the model's every-row hidden states
(what the head reads) against transformers'. As the engine's proposer: its guesses the reference's, the tokens
transformers', through chunks, a batch, a prefix hit, a prefill worker's hand-over and seeded sampling. What is
refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sagellm import LLM
from sagellm.backends.registry import get_backend
from sagellm.common.errors import FieldError
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.model_runner import ModelRunner
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.config import parse_speculative_config
from sagellm.runtime.executor.run import run_pipeline
from sagellm.runtime.models.decoder_graph import build_decoder_graph, build_mtp_graph
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.mtp_head import head_config, head_weights
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.oracle import (
    assert_greedy_through_a_prefix_hit_and_proposals,
    finished_outputs,
    hf_greedy,
    random_prompts,
    run_to_end,
)
from tests.tiny_models import add_mtp_head, make_tiny_qwen3_5, make_tiny_qwen3_5_moe, make_tiny_qwen3_next

BLOCK_SIZE, NUM_BLOCKS, MAX_LEN = 4, 16, 64
GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


MAKERS = {"qwen3_5": make_tiny_qwen3_5, "qwen3_5_moe": make_tiny_qwen3_5_moe, "qwen3_next": make_tiny_qwen3_next}


@pytest.fixture(scope="module", params=list(MAKERS))
def qwen3_5_with_head(request, tmp_path_factory):
    return add_mtp_head(MAKERS[request.param](tmp_path_factory.mktemp("mtp") / request.param))


def stacked(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub's per-expert tensors of a layer as transformers' stacked ones."""
    experts = sorted({int(name.split(".")[2]) for name in layer if name.startswith("mlp.experts.")})
    out = {name: t for name, t in layer.items() if not name.startswith("mlp.experts.")}
    if experts:
        out["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([layer[f"mlp.experts.{e}.gate_proj.weight"], layer[f"mlp.experts.{e}.up_proj.weight"]])
             for e in experts])  # fmt: skip
        out["mlp.experts.down_proj"] = torch.stack([layer[f"mlp.experts.{e}.down_proj.weight"] for e in experts])
    return out


def reference_head(model_dir, hf, ids: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's Qwen3.5 MTP forward over whole rows (no cache), of transformers' modules: logits [T, V] and normed
    hidden states [T, H] of tokens `ids` each with the model's final hidden state at the position before it
    (`hidden`, [T, H])."""
    config = hf.config
    stored = load_file(str(model_dir / "mtp.safetensors"))
    full = config.layer_types.index("full_attention")
    layer = type(hf.model.layers[full])(config, full).eval()
    layer.load_state_dict(stacked({k.removeprefix("mtp.layers.0."): v for k, v in stored.items() if ".layers." in k}))
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[name] = copy.deepcopy(hf.model.norm)
        norms[name].weight.data.copy_(stored[f"mtp.{name}.weight"])
    embedded = norms["pre_fc_norm_embedding"](hf.model.embed_tokens(ids[None]))
    joined = torch.cat([embedded, norms["pre_fc_norm_hidden"](hidden[None])], dim=-1)
    x = joined @ stored["mtp.fc.weight"].T
    positions = torch.arange(ids.numel())[None]  # a row's position is its hidden state's (vLLM's)
    x = norms["norm"](layer(x, position_embeddings=hf.model.rotary_emb(x, positions), position_ids=positions))
    return hf.lm_head(x)[0], x[0]


def reference_guesses(model_dir, hf, tokens: list[int], k: int) -> list[int]:
    """The head's k greedy guesses after `tokens`: the first from the model's hidden states, each next one with the
    guess before it as its token and the head's own hidden state in place of the model's."""
    with torch.no_grad():
        hidden = hf.model(torch.tensor([tokens])).last_hidden_state[0][:-1]
        ids, guesses = tokens[1:], []
        for _ in range(k):
            logits, own = reference_head(model_dir, hf, torch.tensor(ids), hidden)
            guesses.append(int(logits[-1].argmax()))
            ids, hidden = ids + guesses[-1:], torch.cat([hidden, own[-1:]])
    return guesses


def recorded_proposals(engine: LLMEngine) -> list[tuple[list[int], list[int]]]:
    """What the engine's proposer will guess, as it guesses: (the sequence's tokens then, the guesses)."""
    proposer, proposals = engine.speculator.proposer, []
    propose_batch = proposer.propose_batch

    def recorded(requests):
        guesses = propose_batch(requests)
        proposals.extend((list(seq.token_ids), made) for (seq, _), made in zip(requests, guesses) if made)
        return guesses

    proposer.propose_batch = recorded
    return proposals


def runner(loaded, graph, config=None) -> ModelRunner:
    weights = head_weights(loaded.weights) if config is not None else loaded.weights
    config = config or loaded.config
    slots = {"num_state_slots": 1} if config.num_linear_layers else {}
    return ModelRunner(config, weights, get_backend("cpu"), num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                       max_model_len=MAX_LEN, graph=graph, **slots)  # fmt: skip


def every_row(run: ModelRunner, seq: Sequence, n: int, **carried) -> dict[str, torch.Tensor]:
    """`seq`'s next `n` tokens through `run`, every row's outputs (as prompt logprobs would score them)."""
    step = run.step_inputs(ScheduledBatch([seq], [n]))
    step.logits_rows = None
    out = run.forward(step, carried)
    seq.num_computed_tokens += n
    return out


def test_the_heads_logits_are_the_reference_through_a_chunked_prefill_and_a_decode(qwen3_5_with_head):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(qwen3_5_with_head, dtype=torch.float32).eval()
    loaded = load_model(qwen3_5_with_head, mtp_head=True)
    assert loaded.config.num_mtp_layers == 1
    ids = torch.randint(0, loaded.config.vocab_size, (21,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_hidden = hf.model(ids[None]).last_hidden_state[0]
        expected, _ = reference_head(qwen3_5_with_head, hf, ids[1:], expected_hidden[:-1])

    target = runner(loaded, build_decoder_graph(loaded.config, hidden_states=True))
    seq = Sequence("r", ids[:-1].tolist(), SamplingParams(temperature=0))
    seq.block_table, seq.state_slot = list(range(NUM_BLOCKS)), 0
    hidden = every_row(target, seq, seq.num_tokens)["hidden_states"]
    # to the oracle's tolerance (tests/oracle.py): 1e-4 of the largest value, as the sum order of the linear
    # attention's chunks differs from transformers' (up to 2.3e-4 of hidden states up to 7, on one CPU)
    scale = expected_hidden.abs().max().item()
    torch.testing.assert_close(hidden, expected_hidden[:-1], atol=1e-4 * scale, rtol=1e-4)

    config = head_config(loaded.config)
    head = runner(loaded, build_mtp_graph(config), config)
    shadow = Sequence("r", ids[1:].tolist(), SamplingParams(temperature=0))
    shadow.block_table = list(range(NUM_BLOCKS))
    parts = [every_row(head, shadow, n, hidden=hidden[a : a + n]) for a, n in ((0, 7), (7, 12))]
    parts.append(every_row(head, shadow, 1, hidden=hidden[19:20]))  # a decode over the cache of both chunks
    logits = torch.cat([part["logits"] for part in parts])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert all(part["hidden_states"].shape == (part["logits"].shape[0], config.hidden_size) for part in parts)


def test_the_loader_refuses_a_head_a_model_lacks_and_one_with_a_missing_tensor(qwen3_5_with_head, tmp_path):
    plain = make_tiny_qwen3_5(tmp_path / "plain")
    with pytest.raises(ModelLoadError, match="has no multi-token prediction head"):
        load_model(plain, mtp_head=True)
    assert not any(name.startswith("mtp.") for name in load_model(qwen3_5_with_head).weights.keys())  # noqa: SIM118
    broken = add_mtp_head(make_tiny_qwen3_5(tmp_path / "broken"))
    tensors = load_file(str(broken / "mtp.safetensors"))
    del tensors["mtp.pre_fc_norm_hidden.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(broken / "mtp.safetensors"))
    with pytest.raises(ModelLoadError, match="missing tensor mtp.pre_fc_norm_hidden.weight"):
        load_model(broken, mtp_head=True)


def test_mtp_proposals_are_the_heads_guesses_and_greedy_tokens_stay_transformers(qwen3_5_with_head):
    """The engine with the head proposing 3 tokens, through chunked prefill (16-token steps), a batch and a prefix
    hit: every proposal is the reference head's greedy guesses after the sequence's tokens, and every request's
    tokens are transformers'."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(qwen3_5_with_head, dtype=torch.float32).eval()
    speculative = {"method": "mtp", "num_speculative_tokens": 3, "adaptive": False}
    config = EngineConfig(model=str(qwen3_5_with_head), speculative_config=speculative, backend="cpu",
                          block_size=BLOCK_SIZE, num_kv_blocks=200, max_num_batched_tokens=16)  # fmt: skip
    engine = LLMEngine(config)
    proposals = recorded_proposals(engine)
    assert_greedy_through_a_prefix_hit_and_proposals(engine, hf, SamplingParams(max_tokens=12, temperature=0,
                                                                                 ignore_eos=True))  # fmt: skip
    assert len(proposals) > 10 and max(len(made) for _, made in proposals) == 3
    for tokens, made in proposals[::3]:
        assert made == reference_guesses(qwen3_5_with_head, hf, tokens, len(made))


def test_a_decode_worker_guesses_from_the_head_kv_the_prefill_worker_hands_over(qwen3_5_with_head):
    """Prefill and decode workers, both with the head: the hand-over carries the head's KV of the prompt after the
    model's layers; the decode worker's first guesses are the reference head's and its tokens transformers'. A
    decode worker without the head takes the model's layers alone; one with the head given no head KV guesses
    nothing for that prompt."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(qwen3_5_with_head, dtype=torch.float32).eval()
    mtp = {"method": "mtp", "num_speculative_tokens": 2, "adaptive": False}
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = random_prompts(64, [9, 14], seed=7)

    def engine(speculative):
        return LLMEngine(EngineConfig(model=str(qwen3_5_with_head), speculative_config=speculative, backend="cpu",
                                      block_size=BLOCK_SIZE, num_kv_blocks=100))  # fmt: skip

    prefill = engine(mtp)
    for i, p in enumerate(prompts):
        prefill.add_request(str(i), p, greedy, prefill_only=True)
    handed = finished_outputs(prefill)
    layers = sum(kind == "full_attention" for kind in hf.config.layer_types)
    assert all(o.kv.shape[0] == layers + 1 for o in handed)
    for speculative, head_kv in ((mtp, True), (None, True), (mtp, False)):
        decode = engine(speculative)
        firsts = []
        for o in handed:
            kv = o.kv if head_kv else o.kv[:layers]
            first = o.outputs[0].token_ids[0]
            firsts.append(decode.add_prefilled_request(o.request_id, o.prompt_token_ids, greedy, first, kv,
                                                       states=o.states))  # fmt: skip
            assert decode._requests[o.request_id].seq.num_computed_tokens == len(o.prompt_token_ids)
        proposals = recorded_proposals(decode) if speculative else []
        tokens = run_to_end(decode, firsts)
        assert [tokens[str(i)] for i in range(len(prompts))] == [hf_greedy(hf, p, 8) for p in prompts]
        if speculative and head_kv:
            first_guesses = [(t, m) for t, m in proposals if len(t) in {len(p) + 2 for p in prompts}]
            assert len(first_guesses) == len(prompts)  # each prompt's first decode step's guesses
            for t, made in first_guesses:
                assert made == reference_guesses(qwen3_5_with_head, hf, t, len(made))
        elif speculative:
            assert not proposals


def test_seeded_sampling_with_mtp_proposals_draws_what_plain_decoding_draws(qwen3_5_with_head):
    prompts = random_prompts(64, [5, 17, 9, 1], seed=5)
    seeded = SamplingParams(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True)
    runs = {}
    for speculative in (None, {"method": "mtp", "num_speculative_tokens": 2, "adaptive": False}):
        config = EngineConfig(model=str(qwen3_5_with_head), speculative_config=speculative, backend="cpu",
                              block_size=BLOCK_SIZE, num_kv_blocks=200)  # fmt: skip
        engine = LLMEngine(config)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, seeded)
        runs[speculative is not None] = run_to_end(engine, [])
    assert runs[True] == runs[False]
    assert engine.stats().spec_decode_num_draft_tokens > 0


def test_mtp_is_refused_for_a_model_without_a_head_and_with_ngram_settings(tmp_path):
    plain = make_tiny_qwen3_5(tmp_path / "plain")
    mtp = {"method": "mtp", "num_speculative_tokens": 2}
    with pytest.raises(ModelLoadError, match="has no multi-token prediction head"):
        LLMEngine(EngineConfig(model=str(plain), speculative_config=mtp, backend="cpu"))
    with pytest.raises(FieldError, match="prompt_lookup_min/max are ngram's, not mtp's"):
        parse_speculative_config(mtp | {"prompt_lookup_max": 3})


@pytest.mark.slow  # two worker processes
def test_pd_yaml_with_the_head_on_both_workers_gives_transformers_tokens(qwen3_5_with_head):
    """graphs/pd.yaml, both workers with the head: the hand-over, the head's layer after the model's, crosses
    processes; the tokens are one engine's alone."""
    if qwen3_5_with_head.name != "qwen3_5":
        pytest.skip("the dense model's run covers the hand-over: the head's layer is alike in each")
    texts = ["w1 w2 w3 w4 w5 w6 w7", "w9 w8 w7 w6"]
    mtp = {"method": "mtp", "num_speculative_tokens": 2}
    source = {"prompts": texts, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "chat": False}
    overrides = {"model": str(qwen3_5_with_head), **{f"source.{k}": v for k, v in source.items()}}
    overrides |= {f"{node}.speculative_config": mtp for node in ("prefill", "decode")}
    result = run_pipeline(load_pipeline(GRAPHS / "pd.yaml", overrides=overrides))
    alone = LLM(str(qwen3_5_with_head)).generate(texts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [result.outcomes[f"req-{i}"].token_ids for i in range(len(texts))] == [o.outputs[0].token_ids for o in alone]
    assert result.operators["pd_split"].decisions["pd"] == len(texts)
