"""The scheduler's one waiting line: a request waits there, and only there, until every admission gate lets it
start; by LoRA adapter slot, and by its `n` group's prompt being computed."""

from pathlib import Path

from sagellm.runtime.engine.lora_slots import LoraSlots
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.models.lora_adapter import LoraAdapter


def adapter(name: str) -> LoraAdapter:
    return LoraAdapter(name, Path(f"/adapters/{name}"), 8, 16.0, 2.0, None, {})


def seq(request_id: str, n: int, start: int = 0, **fields) -> Sequence:
    s = Sequence(request_id, list(range(start, start + n)), SamplingParams())
    for name, value in fields.items():
        setattr(s, name, value)
    return s


def run_step(s: Scheduler) -> list[str]:
    """One step; returns the ids it computed tokens for, each sampled sequence given a token."""
    batch = s.schedule()
    for sampled in s.complete_step(batch):
        sampled.append_token(1)
    return [q.request_id for q in batch.seqs]


def test_a_request_whose_adapter_finds_no_slot_waits_in_the_line_and_others_pass_it():
    slots = LoraSlots({}, max_loras=1, max_rank=8)
    loads: list[tuple[int, str]] = []
    slots.load = lambda slot, a: loads.append((slot, a.name))
    s = Scheduler(SchedulerConfig(4, 64, 256, 64, 4), slots)
    a, b = adapter("a"), adapter("b")
    a1, b1 = seq("a1", 4, lora_adapter=a), seq("b1", 4, 100, lora_adapter=b)
    a2, base = seq("a2", 4, 200, lora_adapter=a), seq("base", 4, 300)
    for q in (a1, b1, a2, base):
        s.add(q)

    assert run_step(s) == ["a1", "a2", "base"]  # b1's adapter finds the one slot held by a: passed over
    assert list(s.waiting) == [b1] and s.may_start(b1) is False
    assert (a1.lora_slot, a2.lora_slot, base.lora_slot, b1.lora_slot) == (0, 0, -1, -1)
    assert loads == [(0, "a")]  # one load for both of a's requests

    s.finish(a1, "stop")
    run_step(s)
    assert list(s.waiting) == [b1]  # a2 still holds a's slot
    s.finish(a2, "stop")
    assert s.may_start(b1)
    assert "b1" in run_step(s)
    assert b1.lora_slot == 0 and loads == [(0, "a"), (0, "b")]


def test_a_preempted_request_gives_its_adapters_slot_back_and_takes_it_again_to_run():
    slots = LoraSlots({}, max_loras=1, max_rank=8)
    slots.load = lambda slot, a: None
    s = Scheduler(SchedulerConfig(4, 64, 256, 4, 4), slots)  # 4 blocks of 4 tokens
    base, a1 = seq("base", 8), seq("a1", 4, 100, lora_adapter=adapter("a"))
    s.add(base)
    run_step(s)  # base: 2 blocks, and a token
    s.add(a1)
    assert run_step(s) == ["base", "a1"]  # base's third block, a1's one: the cache is full
    assert a1.lora_slot == 0
    assert run_step(s) == ["base"]  # a1's next token needs a block: a1, the latest admitted, is preempted
    assert a1.lora_slot == -1 and slots.can_acquire(adapter("b"))  # nothing holds the slot now
    s.finish(base, "stop")
    assert run_step(s) == ["a1"] and a1.lora_slot == 0


def test_the_choices_of_one_group_wait_in_the_line_until_the_first_computed_their_prompt():
    s = Scheduler(SchedulerConfig(4, 8, 256, 64, 4))
    choices = [seq(f"c{i}", 14, group="g") for i in range(3)]
    other = seq("other", 4, 500)
    for q in (*choices, other):
        s.add(q)

    assert run_step(s) == ["c0"]  # 8 of c0's 14 prompt tokens fill the step; the other choices wait for them
    assert not s.may_start(choices[1]) and s.may_start(other)
    assert run_step(s) == ["c0", "other"]  # c0's last 6 tokens, 2 of other's: the choices wait, `other` passes them
    assert choices[0].num_output_tokens == 1
    batch = s.schedule()  # c0's prompt is computed: its three full blocks are cached, each choice computes 2 tokens
    assert {q.request_id: n for q, n in zip(batch.seqs, batch.num_new_tokens)} == {
        "c0": 1, "other": 2, "c1": 2, "c2": 2,
    }  # fmt: skip
    assert choices[1].num_cached_tokens == choices[2].num_cached_tokens == 12


def test_a_group_whose_first_choice_ends_before_its_prompt_is_computed_is_led_by_the_next():
    s = Scheduler(SchedulerConfig(4, 8, 256, 64, 4))
    choices = [seq(f"c{i}", 14, group="g") for i in range(3)]
    for q in choices:
        s.add(q)
    assert run_step(s) == ["c0"]
    s.finish(choices[0], "abort")
    assert run_step(s) == ["c1"]  # the next leads, alone (from c0's two cached blocks): c2 waits for its prompt
    assert run_step(s) == ["c1", "c2"]


def test_long_prompts_a_gate_holds_back_are_not_counted_as_held_back_for_a_long_prompt():
    """`num_held_back` counts the long prompts that wait for a running long one to be through (what the engine
    operator adds to its capacity), not those that wait for their adapter's slot or their group's prompt."""
    slots = LoraSlots({}, max_loras=1, max_rank=8)
    slots.load = lambda slot, a: None
    s = Scheduler(SchedulerConfig(8, 64, 1024, 256, 4, long_prefill_token_threshold=8), slots)
    choices = [seq(f"c{i}", 40, group="g") for i in range(2)]
    for q in (seq("a1", 4, 100, lora_adapter=adapter("a")), *choices):
        s.add(q)
    assert run_step(s) == ["a1"]  # a short prompt waited: the step was its alone
    assert run_step(s) == ["a1", "c0"]  # c0 takes the one long seat; c1 waits for its prompt
    s.add(seq("b1", 40, 200, lora_adapter=adapter("b")))  # long, and its adapter finds no slot (a1 holds the one)
    s.add(seq("long", 40, 300))
    assert not s.may_start(choices[1]) and [q.request_id for q in s.waiting] == ["c1", "b1", "long"]
    assert s.num_held_back() == 1  # `long` alone waits for c0 to be through
