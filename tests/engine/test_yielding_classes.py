"""The `low` class and after yield to the others (a batch job beside live traffic, runtime/engine/yielding.py): their
prompts compute at most a step's worth between them; beside a higher class, only what they earned from its work, a
whole step's worth at a time, and nothing in a step that starts a higher class's short prompt; their decodes join
every step; what they compute is unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.runtime.engine import yielding
from sagellm.runtime.engine.priority_classes import PRIORITY_CLASSES
from tests.engine.test_long_prefills import chunks, make, seq, step
from tests.oracle import hf_greedy, random_prompts
from tests.tiny_models import make_tiny_llama

LOW, NORMAL = PRIORITY_CLASSES["low"], PRIORITY_CLASSES["normal"]


@pytest.fixture
def small_steps(monkeypatch):
    """8 yielding tokens a step, one earned for each token of a higher class: rules seen in a few steps."""
    monkeypatch.setattr(yielding, "YIELDING_STEP_TOKENS", 8)
    monkeypatch.setattr(yielding, "YIELDING_SHARE", 1)


def test_alone_low_prompts_compute_a_step_s_worth_between_them():
    s = make(threshold=128, partial=2, long=2, budget=256)
    s.add(seq("b1", 50, priority=LOW))
    s.add(seq("b2", 50, start=100, priority=LOW))
    assert chunks(step(s)) == {"b1": 50, "b2": 14}
    assert chunks(step(s)) == {"b1": 1, "b2": 36}


def test_beside_a_higher_class_they_compute_what_they_earned_a_step_s_worth_at_a_time(small_steps):
    s = make(threshold=8, partial=2, long=2, budget=64)
    s.add(seq("chat", 4, priority=NORMAL))
    s.add(seq("batch", 20, start=100, priority=LOW))
    assert chunks(step(s)) == {"chat": 4}  # a step that starts a live prompt: the low one waits it out
    for _ in range(4):  # earning 1 a step, from 4
        assert chunks(step(s)) == {"chat": 1}
    assert chunks(step(s)) == {"chat": 1, "batch": 8}
    for _ in range(7):
        assert chunks(step(s)) == {"chat": 1}
    assert chunks(step(s)) == {"chat": 1, "batch": 8}


def test_a_step_that_starts_a_live_prompt_gives_the_low_ones_none_but_their_decodes(small_steps):
    s = make(threshold=8, partial=2, long=2, budget=64)
    s.add(seq("done", 3, start=50, priority=LOW))
    assert chunks(step(s)) == {"done": 3}  # alone
    s.add(seq("chat", 12, priority=NORMAL))
    s.add(seq("batch", 30, start=100, priority=LOW))
    assert chunks(step(s)) == {"done": 1, "chat": 8}  # 12 tokens is long here: 8 a step
    assert chunks(step(s)) == {"done": 1, "chat": 4, "batch": 8}  # 8 earned
    s.add(seq("live", 6, start=200, priority=NORMAL))
    assert chunks(step(s)) == {"done": 1, "chat": 1, "live": 6}  # credit again, but a live prompt starts
    assert chunks(step(s)) == {"done": 1, "chat": 1, "live": 1, "batch": 8}


def test_a_low_prompt_mid_prefill_holds_no_seat_a_live_long_prompt_needs(small_steps):
    """One partial prefill at a time (vLLM's default): the low prompt, going on at what it earns, must not keep a
    live long prompt waiting for that seat."""
    s = make(threshold=8, partial=1, long=1, budget=32)
    s.add(seq("chat", 4, priority=NORMAL))
    s.add(seq("batch", 40, start=100, priority=LOW))
    step(s)  # the chat's prompt
    while "batch" not in chunks(step(s)):  # the chat's decodes earn the low prompt its first 8 tokens
        pass
    s.add(seq("long", 30, start=200, priority=NORMAL))
    assert chunks(step(s)) == {"chat": 1, "long": 8}


def test_once_no_higher_class_is_left_they_need_no_credit(small_steps):
    s = make(threshold=8, partial=2, long=2, budget=64)
    s.add(chat := seq("chat", 4, priority=NORMAL))
    s.add(seq("batch", 30, start=100, priority=LOW))
    assert chunks(step(s)) == {"chat": 4}
    s.finish(chat, "stop")
    assert chunks(step(s)) == {"batch": 8}
    assert chunks(step(s)) == {"batch": 8}


def test_with_the_shares_off_they_take_what_the_budget_leaves():
    s = make(threshold=0, budget=256)
    s.add(seq("chat", 4, priority=NORMAL))
    s.add(seq("batch", 200, start=100, priority=LOW))
    assert chunks(step(s)) == {"chat": 4, "batch": 200}


def test_yielding_steps_keep_the_oracles_tokens(tmp_path, small_steps):
    """Low requests' prompts in chunks beside normal ones, held while another normal one starts: the tokens are
    `transformers`' greedy ones."""
    path = make_tiny_llama(tmp_path / "llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), backend="cpu", block_size=4, num_kv_blocks=64, long_prefill_token_threshold=6)
    prompts = random_prompts(hf.config.vocab_size, [5, 23, 17, 4])
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine, finished = llm.engine, {}

    def step() -> None:
        finished.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})

    for i, (prompt, priority) in enumerate(zip(prompts, (NORMAL, LOW, LOW, NORMAL))):
        engine.add_request(str(i), prompt, params, priority=priority)
        step()
    while engine.has_unfinished_requests():
        step()
    for i, prompt in enumerate(prompts):
        assert finished[str(i)] == hf_greedy(hf, prompt, 6)
