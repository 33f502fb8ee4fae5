"""Long prompts share the engine (vLLM's --long-prefill-token-threshold, --max-num-partial-prefills and
--max-long-partial-prefills): a long prompt computes at most the threshold a step, short prompts waiting behind long
ones without a seat start ahead of them, a step scores at most the threshold's prompt positions, and the tokens and
prompt logprobs stay the oracle's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.common.errors import FieldError
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.long_prefills import SHORTS_QUIET_S, PrefillShares, long_prefill_shares
from sagellm.runtime.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence, SequenceStatus
from sagellm.runtime.pipeline.messages import Request, TokenDelta
from sagellm.runtime.pipeline.operator import OperatorContext, get_operator
from tests.engine.test_prompt_logprobs import TOP, assert_matches_oracle, oracle
from tests.oracle import hf_greedy, random_prompts
from tests.tiny_models import make_tiny_llama


def make(threshold=8, partial=1, long=1, budget=64, max_num_seqs=8, policy="fcfs", context_scale=0) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs, budget, 1024, 256, 4, scheduling_policy=policy,
                        long_prefill_token_threshold=threshold, max_num_partial_prefills=partial,
                        max_long_partial_prefills=long, long_prefill_context_scale=context_scale)
    )  # fmt: skip


def seq(request_id: str, n: int, start: int = 0, prompt_logprobs: int | None = None, priority: int = 0) -> Sequence:
    made = Sequence(request_id, list(range(start, start + n)), SamplingParams(prompt_logprobs=prompt_logprobs))
    made.priority = priority
    if prompt_logprobs is not None:
        made.prompt_logprobs = [None]  # as the engine starts a request that scores its prompt
    return made


def step(s: Scheduler) -> ScheduledBatch:
    """One step, the prompt positions it scores filled in as the engine would, each sampled sequence given a token."""
    batch = s.schedule()
    for x, n in zip(batch.seqs, batch.num_new_tokens):
        if x.scores_prompt:
            x.prompt_logprobs += [object()] * len(x.prompt_scored_positions(n))
    for sampled in s.complete_step(batch):
        sampled.append_token(1)
    return batch


def chunks(batch: ScheduledBatch) -> dict[str, int]:
    return {x.request_id: n for x, n in zip(batch.seqs, batch.num_new_tokens)}


def prefill_chunks(s: Scheduler, x: Sequence) -> list[int]:
    """The tokens each step computes of `x`'s prompt, to its first token."""
    seen = []
    while x.num_output_tokens == 0:
        seen.append(chunks(step(s))[x.request_id])
    return seen


@pytest.mark.parametrize(
    "tokens, expected",
    [(30, [8, 8, 8, 6]), (26, [8, 8, 10])],
    ids=["at-most-the-threshold", "a-sliver-rides-along"],
)
def test_a_long_prompts_chunk_is_the_threshold_and_a_sliver_left_after_one_rides_along(tokens, expected):
    """At most 8 while more than 8 are left; the rest in one step. A step for 2 tokens would pay a step's fixed cost
    and look like a decode: what a quarter of the chunk or less would leave is taken with the chunk before it."""
    s = make(threshold=8, budget=64)
    a = seq("a", tokens)
    s.add(a)
    assert prefill_chunks(s, a) == expected


def test_by_default_prompts_that_fit_a_step_are_not_long_and_the_longer_take_small_chunks():
    """The engine's default: long past the step's budget (W1's prompts fill steps as before), 48 tokens a step, 32
    prompt positions scored for logprobs."""
    assert long_prefill_shares(None, 512) == {"long_prefill_token_threshold": 512, "long_prefill_chunk_tokens": 48,
                                              "long_prefill_scored_tokens": 32,
                                              "long_prefill_whole_alone": True}  # fmt: skip
    assert long_prefill_shares(8, 512) == {"long_prefill_token_threshold": 8, "long_prefill_chunk_tokens": 8,
                                           "long_prefill_scored_tokens": 8}  # fmt: skip
    shares = long_prefill_shares(None, 64) | {"long_prefill_chunk_tokens": 8}  # the default's rule, a smaller chunk
    s = Scheduler(SchedulerConfig(8, 64, 1024, 256, 4, **shares))
    fits, other, long = seq("fits", 40), seq("other", 20, start=100), seq("long", 100, start=200)
    for x in (fits, other, long):
        s.add(x)
    assert chunks(step(s)) == {"fits": 40, "other": 20}  # whole, together, as without long prefills
    assert chunks(step(s))["long"] == 8


def test_by_default_a_long_prompt_alone_takes_whole_steps_and_its_share_again_once_a_chat_comes():
    """Alone in the engine a long prompt computes the step's budget (nobody waits on its chunks); a chat arriving
    has the next step to itself, and the long prompt computes its small chunks beside the chat's decodes after, and
    for SHORTS_QUIET_S after the last chat (a server that chats may chat again) even once it is alone again."""
    shares = long_prefill_shares(None, 64) | {"long_prefill_chunk_tokens": 8}
    s = Scheduler(SchedulerConfig(8, 64, 1024, 256, 4, **shares))
    now = [100.0]
    s.shorts.clock = lambda: now[0]
    long = seq("long", 400)
    s.add(long)
    assert [chunks(step(s))["long"] for _ in range(2)] == [64, 64]
    chat = seq("chat", 20, start=500)
    s.add(chat)
    assert chunks(step(s)) == {"chat": 20}
    assert chunks(step(s)) == {"chat": 1, "long": 8}
    s.finish(chat, "abort")  # its client left
    now[0] += SHORTS_QUIET_S / 2
    assert chunks(step(s)) == {"long": 8}  # alone, but a chat came 5 s ago
    now[0] += SHORTS_QUIET_S
    assert chunks(step(s)) == {"long": 64}
    explicit = make(threshold=8, budget=64)  # vLLM's threshold: alone or not, 8 a step
    alone = seq("alone", 30)
    explicit.add(alone)
    assert prefill_chunks(explicit, alone) == [8, 8, 8, 6]


def test_by_default_a_scored_prompt_is_long_past_the_scored_share_which_a_step_scores_at_most():
    """A prompt scored for its logprobs computes 32 positions a step by default; one not scored, as long, is whole."""
    s = Scheduler(SchedulerConfig(8, 512, 1024, 256, 4, **long_prefill_shares(None, 512)))
    echo, plain = seq("echo", 100, prompt_logprobs=1), seq("plain", 100, start=200)
    s.add(echo)
    s.add(plain)
    assert chunks(step(s)) == {"plain": 100}  # the short prompt's step alone: the scored one is long
    assert prefill_chunks(s, echo) == [32, 32, 32, 4]


def test_a_scored_prompt_short_of_its_last_scored_share_is_held_for_a_short_one():
    """Late in a scored prompt its chunk may cover what is left while its scored share does not: it is then not on
    its last chunk, and a short prompt arriving has the step alone."""
    s = Scheduler(SchedulerConfig(8, 512, 1024, 256, 4, **long_prefill_shares(None, 512)))
    echo = seq("echo", 240, prompt_logprobs=1)
    s.add(echo)
    while echo.num_computed_tokens < 192:
        step(s)
    assert 240 - echo.num_computed_tokens == 48  # past its 32 scored a step, within its chunk of 48
    s.add(seq("chat", 34, start=500))
    assert chunks(step(s)) == {"chat": 34}


def test_deeper_in_a_long_prompt_its_chunks_shrink_so_each_costs_about_the_same():
    """A token after c others costs 1 + c/S (its attention to them): a chunk after c tokens is T * S / (S + c), to
    the prompt's last one; a short prompt with as deep a cached context still goes whole."""
    s = make(threshold=16, budget=64, context_scale=32)
    a = seq("a", 100)
    s.add(a)
    seen = []
    while a.num_output_tokens == 0:
        computed = a.num_computed_tokens
        n = chunks(step(s))["a"]
        seen.append(n)
        assert n == min(100 - computed, max(1, 16 * 32 // (32 + computed)))
    assert seen[:4] == [16, 10, 8, 7] and seen[-1] < 16 and sum(seen) == 100
    follow_up = Sequence("b", [*range(100), 500, 501, 502, 503, 504, 505], SamplingParams())  # a's 100 are cached
    s.add(follow_up)
    assert chunks(step(s))["b"] == 6


def test_a_short_prompt_has_a_step_of_its_own_then_the_long_one_goes_on():
    s = make(threshold=8, budget=64)
    long, short = seq("long", 40), seq("short", 7, start=100)
    s.add(long)
    step(s)
    s.add(short)
    assert chunks(step(s)) == {"short": 7}  # the long prompt's chunk waits a step: the short one's is a short step
    assert short.num_output_tokens == 1  # its first token after one step
    assert chunks(step(s)) == {"short": 1, "long": 8}


def test_short_prompts_hold_a_long_one_back_at_most_three_steps_in_a_row():
    """A short prompt arriving at every step still leaves the long prompt one step in four (MAX_LONG_HOLDS)."""
    s = make(threshold=8, budget=64, max_num_seqs=32)
    long = seq("long", 60)
    s.add(long)
    computed = []
    for i in range(12):
        s.add(seq(f"short{i}", 4, start=100 + 10 * i))
        batch = chunks(step(s))
        assert batch[f"short{i}"] == 4  # every short prompt starts in the step after it came
        computed.append("long" in batch)
    assert computed == [False, False, False, True] * 3


def test_the_waiting_line_admits_a_short_prompt_while_two_long_ones_prefill():
    s = make(threshold=8, partial=3, long=2, budget=64)
    first, second, third = seq("long1", 40), seq("long2", 40, start=100), seq("long3", 40, start=200)
    for x in (first, second, third):
        s.add(x)
    assert chunks(step(s)) == {"long1": 8, "long2": 8}  # two long seats: the third waits
    short = seq("short", 5, start=300)
    s.add(short)
    assert chunks(step(s)) == {"short": 5}  # behind the third in line, yet started ahead of it, in a step of its own
    assert [x.request_id for x in s.waiting] == ["long3"]
    # The third takes a long seat once the first two are no longer long: in the step of their last 8 tokens.
    while "long3" not in (batch := chunks(step(s))):
        assert first.num_tokens - first.num_computed_tokens > 0
    assert batch == {"long1": 8, "long2": 8, "short": 1, "long3": 8}
    assert first.num_output_tokens == second.num_output_tokens == 1


def test_long_prompts_waiting_for_a_long_seat_are_counted_as_held_back():
    """What the engine operator adds to its capacity: those long prompts hold no seat yet, so short requests may
    come in from upstream and start ahead of them."""
    s = make(threshold=8, partial=2, long=1, budget=64)
    for i in range(4):
        s.add(seq(f"long{i}", 40, start=100 * i))
    assert s.num_held_back() == 3  # one may start: the other three wait for it
    step(s)
    assert s.num_held_back() == 3  # one runs; three wait for it
    s.add(seq("short", 5, start=900))
    assert s.num_held_back() == 3  # a short prompt is never held back


def running(n: int, computed: int, request_id: str = "r") -> Sequence:
    made = seq(request_id, n)
    made.status, made.num_computed_tokens = SequenceStatus.RUNNING, computed
    return made


@pytest.mark.parametrize(
    ("partial", "long", "prefilling", "waiting", "n", "seated"),
    [
        (1, 1, [(40, 8)], 8, 8, True),  # a prompt that ends in this step needs no seat
        (1, 1, [(40, 8)], 8, 4, False),  # cut by the budget: it would go on past the step, and the one seat is taken
        (2, 1, [(40, 8)], 8, 4, True),  # a second seat
        (2, 1, [(40, 8)], 40, 8, False),  # a long prompt: the one long seat is taken
        (2, 2, [(40, 8)], 40, 8, True),
        (2, 2, [(40, 32)], 40, 8, True),  # the running one's last chunk (8 left): no longer long
        (2, 2, [(40, 8), (40, 8)], 40, 8, False),  # two seats, both taken
    ],
)
def test_seats_of_partial_and_long_prefills(partial, long, prefilling, waiting, n, seated):
    now = [running(size, done, f"r{i}") for i, (size, done) in enumerate(prefilling)]
    shares = PrefillShares(8, partial, long, now)
    assert shares.has_seats(seq("w", waiting, start=500), 0, n) is seated


def test_a_step_scores_at_most_the_thresholds_prompt_positions():
    """Four short prompts scored for their logprobs (an `echo` request): 20 positions, 8 a step, each scored once."""
    s = make(threshold=8, budget=64)
    scored = [seq(f"echo{i}", 6, start=10 * i, prompt_logprobs=1) for i in range(4)]
    for x in scored:
        s.add(x)
    rows_per_step = []
    while any(x.num_output_tokens == 0 for x in scored):
        batch = s.schedule()
        rows_per_step.append(sum(len(x.prompt_scored_positions(n)) for x, n in zip(batch.seqs, batch.num_new_tokens)))
        for x, n in zip(batch.seqs, batch.num_new_tokens):
            x.prompt_logprobs += [object()] * len(x.prompt_scored_positions(n))
        for sampled in s.complete_step(batch):
            sampled.append_token(1)
    assert rows_per_step == [8, 8, 4]
    assert all(len(x.prompt_logprobs) == x.num_prompt_tokens for x in scored)


def test_threshold_zero_is_plain_chunked_prefill():
    s = make(threshold=0, budget=16)
    a, b = seq("a", 40), seq("b", 40, start=100)
    s.add(a)
    s.add(b)
    assert chunks(step(s)) == {"a": 16}
    assert chunks(step(s)) == {"a": 16}
    assert chunks(step(s)) == {"a": 8, "b": 8}


def test_under_priority_a_long_prompt_without_a_seat_is_passed_over_too():
    s = make(threshold=8, partial=2, long=1, budget=64, policy="priority")
    s.add(seq("running", 30))
    step(s)
    s.add(seq("long", 30, start=100, priority=0))
    s.add(seq("short", 4, start=200, priority=1))
    assert chunks(step(s)) == {"short": 4}
    assert chunks(step(s)) == {"running": 8, "short": 1}  # `long` waits for the long seat `running` holds


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
        ({"max_num_partial_prefills": 0}, "max_num_partial_prefills"),
        ({"max_num_partial_prefills": 2, "max_long_partial_prefills": 3}, "max_long_partial_prefills"),
    ],
)
def test_bad_settings_name_their_field(settings, field):
    with pytest.raises(FieldError) as raised:
        EngineConfig(model="m", **settings)
    assert raised.value.field == field


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("llama") / "llama")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_shared_prefills_keep_the_oracles_tokens_and_prompt_logprobs(tiny):
    """Long and short prompts, scored and not, through steps of 5-token shares: what the model computes is unchanged."""
    path, hf = tiny
    llm = LLM(str(path), backend="cpu", block_size=4, num_kv_blocks=64, long_prefill_token_threshold=5,
              max_num_partial_prefills=2, max_long_partial_prefills=1)  # fmt: skip
    prompts = random_prompts(hf.config.vocab_size, [33, 4, 27, 6, 3])
    scored = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=TOP)
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, [scored, plain, scored, scored, plain])
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 6)
        if i not in (1, 4):
            assert_matches_oracle(out.prompt_logprobs, prompt, oracle(hf, prompt))


def test_the_engine_operator_takes_short_requests_while_long_ones_wait(tiny):
    """The long prompts waiting in the engine hold no seat: a short request comes in from upstream (where a full
    engine would keep it) and is through before the second long one starts."""
    path, _ = tiny
    op = get_operator("engine")(model=str(path), max_num_seqs=2, long_prefill_token_threshold=4)
    op.open(OperatorContext("engine", instances={}))

    def request(rid: str, tokens: int, start: int) -> Request:
        ids = list(range(start, start + tokens))
        return Request(request_id=rid, prompt_token_ids=ids, sampling=SamplingParams(max_tokens=2))

    op.add(request("long0", 20, 5))
    op.add(request("long1", 20, 40))
    assert op.capacity() == 1  # two seats, both tracked; the second long prompt waits for the first
    op.add(request("short", 3, 80))
    assert op.capacity() == 0
    finished = []
    while op.has_work():
        finished += [d.request_id for d in op.step() if isinstance(d, TokenDelta) and d.finished]
    assert finished == ["short", "long0", "long1"]
