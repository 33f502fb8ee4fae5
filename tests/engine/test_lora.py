"""LoRA adapters in the engine, against PEFT's own model as the oracle: two adapters made with `peft` on a tiny random
Llama (all seven projections at rank 4; q and v at rank 8 with rsLoRA) and the base, their prompts mixed in one
batch, give PEFT's greedy tokens each, on one process and on two ranks (tensor or pipeline parallel); with one slot
for two adapters the requests take turns and still do; a prompt cached under one adapter is not reused under another
or the base; what the engine cannot serve is refused by name. On a GGUF base the decode steps run every layer in one
native call, which adds the adapters' updates as the ops one by one do, bit for bit. With speculative decoding (n-gram,
a draft model, Qwen3.5's MTP head) the proposals are verified under each request's adapter: PEFT's tokens still."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from sagellm import LLM, LoRARequest, SamplingParams
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.execution_graph.fuse_layers import FusedLayers
from tests.oracle import hf_greedy, random_prompts
from tests.tiny_models import add_mtp_head, make_tiny_llama, make_tiny_qwen3_5, write_tiny_gguf

TOKENS = 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(base: Path, directory: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, **lora)
    with torch.no_grad():  # PEFT's random B is small: large enough here to change the greedy tokens
        peft = get_peft_model(model, config)
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    peft.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(root / "base")
    first = _adapter(base, root / "first", 1, r=4, lora_alpha=8, target_modules=ALL)
    second = _adapter(
        base, root / "second", 2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True
    )
    return base, first, second


def _peft_greedy(
    base: Path, adapter: Path | None, prompts: list[list[int]], num_tokens: int = TOKENS
) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return [hf_greedy(model, prompt, num_tokens) for prompt in prompts]


def _tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


@pytest.mark.parametrize("max_loras", [2, 1])
def test_adapters_and_the_base_mixed_in_one_batch_give_peft_s_greedy_tokens(models, max_loras):
    base, first, second = models
    prompts = random_prompts(256, [5, 9, 13, 7, 11, 6], seed=3)
    adapters = {None: None, "first": first, "second": second}
    names = ["first", "second", None, "second", "first", None]
    expected = {name: _peft_greedy(base, path, prompts) for name, path in adapters.items()}
    llm = LLM(str(base), enable_lora=True, max_loras=max_loras, max_lora_rank=8, kv_cache_memory_gb=0.05)
    requests = {
        None: None,
        "first": LoRARequest("first", 1, str(first)),
        "second": LoRARequest("second", 2, str(second)),
    }
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    got = _tokens(llm.generate(prompts, params, lora_request=[requests[n] for n in names]))
    assert got == [expected[name][i] for i, name in enumerate(names)]
    assert expected["first"] != expected[None] != expected["second"]  # the adapters change what is generated


@pytest.mark.parametrize(
    ("parallel", "max_loras"),
    [
        ({"tensor_parallel_size": 2, "pipeline_parallel_size": 1}, 1),
        ({"tensor_parallel_size": 1, "pipeline_parallel_size": 2}, 2),
    ],  # fmt: skip
    ids=["tp2", "pp2"],
)
def test_a_parallel_engine_s_ranks_add_their_slices_of_the_adapters_and_give_peft_s_greedy_tokens(
    models, parallel, max_loras
):
    """Two ranks in two processes: each holds its slice of every adapter (tensor parallel: B's rows of the
    column-parallel weights, A's columns of the row-parallel ones, whose partial updates the all-reduce sums), or its
    stage's layers' (pipeline parallel); with one slot the adapters take turns, loaded on both ranks each time."""
    base, first, second = models
    prompts = random_prompts(256, [5, 9, 13, 7], seed=4)
    adapters = {None: None, "first": first, "second": second}
    names = ["first", "second", None, "first"]
    expected = {name: _peft_greedy(base, path, prompts) for name, path in adapters.items()}
    llm = LLM(str(base), enable_lora=True, max_loras=max_loras, max_lora_rank=8, kv_cache_memory_gb=0.05, **parallel)
    requests = {None: None, "first": LoRARequest("first", 1, str(first)), "second": LoRARequest("second", 2,
                str(second))}  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    try:
        got = _tokens(llm.generate(prompts, params, lora_request=[requests[n] for n in names]))
    finally:
        llm.engine.close()
    assert got == [expected[name][i] for i, name in enumerate(names)]


def test_a_prompt_cached_under_one_adapter_is_not_reused_under_another_or_the_base(models):
    base, first, _ = models
    prompt = random_prompts(256, [40], seed=5)  # more than two blocks: cached after the first request
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    adapter = LoRARequest("first", 1, str(first))
    with_adapter = _tokens(llm.generate(prompt, params, lora_request=adapter))
    base_after = _tokens(llm.generate(prompt, params))
    assert base_after == _peft_greedy(base, None, prompt)
    assert with_adapter == _peft_greedy(base, first, prompt)
    assert _tokens(llm.generate(prompt, params, lora_request=adapter)) == with_adapter  # its own cache is reused
    assert llm.engine.stats().prefix_cache_hits > 0


def test_a_name_given_again_with_another_directory_serves_the_new_adapter(models):
    base, first, second = models
    prompt = random_prompts(256, [40], seed=7)
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    assert _tokens(llm.generate(prompt, params, lora_request=LoRARequest("x", 1, str(first)))) == _peft_greedy(
        base, first, prompt
    )
    again = _tokens(llm.generate(prompt, params, lora_request=LoRARequest("x", 2, str(second))))
    assert again == _peft_greedy(base, second, prompt)  # neither its old weights nor its old cached prompt


def test_what_the_engine_cannot_serve_is_refused_by_name(models, tmp_path):
    base, first, second = models
    params = SamplingParams(temperature=0, max_tokens=2)
    plain = LLM(str(base), kv_cache_memory_gb=0.05)
    with pytest.raises(InvalidInput, match="enable_lora"):
        plain.generate([[1, 2, 3]], params, lora_request=LoRARequest("first", 1, str(first)))
    llm = LLM(str(base), enable_lora=True, max_lora_rank=4, kv_cache_memory_gb=0.05)
    with pytest.raises(FieldError, match="max_lora_rank"):  # rank 8 over the limit
        llm.generate([[1, 2, 3]], params, lora_request=LoRARequest("second", 2, str(second)))
    other = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    foreign = _adapter(other, tmp_path / "foreign", 3, r=4, lora_alpha=8, target_modules=ALL)
    with pytest.raises(InvalidInput, match="another base model"):
        llm.generate([[1, 2, 3]], params, lora_request=LoRARequest("foreign", 3, str(foreign)))
    served = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    assert _tokens(llm.generate([[1, 2, 3]], served)) == _peft_greedy(base, None, [[1, 2, 3]])  # it serves on


def test_the_fused_decoder_layers_add_the_adapters_bit_identically_to_the_ops(models, tmp_path):
    """The base as a Q8_0 GGUF (its linears GGUF blocks): decode steps with adapter rows run every layer in one
    native call, each linear's updates added after it, and give the tokens and logprobs the layers' own ops give."""
    base, first, second = models
    gguf = write_tiny_gguf(tmp_path / "base.Q8_0.gguf", base, "Q8_0")
    llm = LLM(str(gguf), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_gb=0.05)
    try:
        fused = next(i.kernel for i in llm.engine.runner.plan.instrs if isinstance(i.kernel, FusedLayers))
        native, taken = fused.kernel, []

        def counted(hidden, residual, positions, meta, lora_rows):
            out = native(hidden, residual, positions, meta, lora_rows)
            taken.append((lora_rows is not None, out is not None))
            return out

        prompts = random_prompts(256, [5, 9, 13, 7, 11, 6], seed=4)
        requests = [LoRARequest("first", 1, str(first)), LoRARequest("second", 2, str(second)), None] * 2
        params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=5)

        def generate() -> list:
            outs = llm.generate(prompts, params, lora_request=requests)
            return [(o.outputs[0].token_ids, msgspec.to_builtins(o.outputs[0].logprobs)) for o in outs]

        fused.kernel = counted
        with_fused = generate()
        fused.kernel = lambda *args: None
        assert generate() == with_fused
        assert taken.count((True, True)) == TOKENS - 1, "every decode step, its rows on two adapters and none"
        tokens = [t for t, _ in with_fused]
        assert tokens[0] != tokens[2] != tokens[1]  # the adapters act
    finally:
        llm.engine.close()


# Not adaptive: every proposal is verified, whatever this busy machine's step times say.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
         "adaptive": False}  # fmt: skip


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_adapters_with_speculative_decoding_give_peft_s_greedy_tokens(models, method):
    """Proposals verified with each request's adapter on every row of its sequence: prompts that repeat themselves
    (n-gram proposals hit) and one that does not, under two adapters and the base in one batch, give PEFT's greedy
    tokens, and with n-gram requests with an adapter accept proposals. A draft model (the base itself) guesses
    without the adapters: the base's requests accept all its guesses, the adapters' those the adapter agrees with."""
    base, first, second = models
    a, b, c = random_prompts(256, [6, 5, 9], seed=3)
    prompts = [a * 3, b * 3 + a[:2], c, c + c[:4], a * 3, b * 3]
    names = ["first", "second", None, "first", None, "second"]
    num_tokens = 16
    adapters = {None: None, "first": first, "second": second}
    expected = {name: _peft_greedy(base, path, prompts, num_tokens) for name, path in adapters.items()}
    config = NGRAM if method == "ngram" else {"model": str(base), "num_speculative_tokens": 3, "adaptive": False}
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_gb=0.05,
              speculative_config=config)  # fmt: skip
    verified, checked = llm.engine.speculator.verified, {True: [0, 0], False: [0, 0]}  # adapter? -> proposed, kept

    def counted(seq, accepted: int) -> None:
        counts = checked[seq.lora_slot >= 0]
        counts[0], counts[1] = counts[0] + len(seq.spec_token_ids), counts[1] + accepted
        verified(seq, accepted)

    llm.engine.speculator.verified = counted
    requests = {None: None, "first": LoRARequest("first", 1, str(first)), "second": LoRARequest("second", 2,
                str(second))}  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    got = _tokens(llm.generate(prompts, params, lora_request=[requests[n] for n in names]))
    assert got == [expected[name][i] for i, name in enumerate(names)]
    if method == "ngram":
        assert checked[True][1] > 0, checked  # rows of proposals under an adapter were kept
    else:
        assert checked[True][0] > 0 and checked[False][0] == checked[False][1] > 0, checked
    stats = llm.engine.stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens  # hits and misses
    assert expected["first"][0] != expected[None][0] and expected["second"][1] != expected[None][1]  # they act


def test_an_adapter_with_the_model_s_mtp_head_proposing_gives_peft_s_greedy_tokens(tmp_path):
    """Qwen3.5's MTP head guesses without the adapter, from the adapted model's hidden states; the target verifies
    each guess with it, its recurrent layers' states rolled back past a rejected one: PEFT's tokens."""
    base = add_mtp_head(make_tiny_qwen3_5(tmp_path / "qwen3_5"))
    adapter = _adapter(base, tmp_path / "adapter", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                       "gate_proj", "down_proj"])  # fmt: skip
    a, c = random_prompts(256, [6, 9], seed=3)
    prompts, names = [a * 3, c, a * 3], ["adapter", "adapter", None]
    expected = {name: _peft_greedy(base, path, prompts) for name, path in {None: None, "adapter": adapter}.items()}
    llm = LLM(str(base), enable_lora=True, max_lora_rank=4, kv_cache_memory_gb=0.05,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2, "adaptive": False})  # fmt: skip
    request = LoRARequest("adapter", 1, str(adapter))
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    got = _tokens(llm.generate(prompts, params, lora_request=[request if n else None for n in names]))
    assert got == [expected[name][i] for i, name in enumerate(names)]
    assert expected["adapter"][0] != expected[None][0]
    assert llm.engine.stats().spec_decode_num_draft_tokens > 0
