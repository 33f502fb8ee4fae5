"""The recurrent states' bookkeeping (Qwen3.5): a seat slot per running sequence, given back on finish and
preemption; prefix checkpoints planned at block boundaries, usable once their step ran, restored on a prefix hit
(the hit cut to the longest prefix that has one), never replaced while a scheduled step reads them."""

from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.state_slots import StateSlots


def make(max_num_seqs=2, checkpoints=2, budget=64, num_blocks=64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 256, num_blocks, 4, num_state_slots=max_num_seqs,
                                     num_state_checkpoints=checkpoints))  # fmt: skip


def seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams())


def step(s: Scheduler):
    batch = s.schedule()
    for sampled in s.complete_step(batch):
        sampled.append_token(1)
    return batch


def test_running_sequences_hold_a_seat_each_and_give_it_back():
    s = make(max_num_seqs=2)
    a, b = seq("a", range(6)), seq("b", range(10, 16))
    s.add(a)
    s.add(b)
    step(s)
    assert {a.state_slot, b.state_slot} == {0, 1}
    s.finish(a, "stop")
    assert a.state_slot == -1 and s.state_slots.can_seat()
    c = seq("c", range(20, 26))
    s.add(c)
    step(s)
    assert c.state_slot == 0  # a's seat


def test_a_prefill_checkpoints_its_last_block_boundary_and_a_later_prompt_restores_it():
    s = make()
    a = seq("a", range(11))  # the boundary before its last token: 8 (two blocks of 4)
    s.add(a)
    batch = step(s)
    (tokens, checkpoint) = batch.checkpoints[a]
    assert tokens == 8 and checkpoint >= 2  # checkpoint slots follow the seats
    b = seq("b", [*range(10), 99])  # shares a's first 10 tokens: blocks 0-1 have a checkpoint, block 2 is partial
    s.add(b)
    batch = step(s)
    assert batch.restores[b] == checkpoint
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 11


def test_a_hit_is_cut_to_the_longest_prefix_with_a_checkpoint():
    s = make(checkpoints=4)
    a = seq("a", range(13))  # one chunk: its states are kept after 12 tokens only
    s.add(a)
    assert step(s).checkpoints[a][0] == 12
    b = seq("b", [*range(9), 77, 78, 79, 80])  # shares a's first two blocks, not the third
    s.add(b)
    batch = step(s)
    assert b.num_cached_tokens == 0 and b not in batch.restores  # blocks cached, but no states after 8 tokens
    assert batch.checkpoints[b][0] == 12


def test_chunked_prefill_checkpoints_each_chunks_boundary():
    s = make(budget=4, checkpoints=4)
    a = seq("a", range(13))
    s.add(a)
    batches = [step(s) for _ in range(4)]
    assert [b.checkpoints[a][0] for b in batches[:3]] == [4, 4, 4]  # after 4, 8 and 12 tokens
    assert a not in batches[3].checkpoints  # its last token (a decode) crosses no boundary before the prompt's end
    c = seq("c", [*range(9), 77])
    s.add(c)
    step(s)
    assert c.num_cached_tokens == 8


def test_a_checkpoint_is_usable_only_once_its_step_ran():
    slots = StateSlots(num_seats=1, num_checkpoints=1)
    slot = slots.plan_checkpoint(7)
    assert slot == 1 and not slots.has_checkpoint(7) and slots.plan_checkpoint(7) is None
    slots.step_done(ran=False)  # the step failed: the slot is free again, nothing is kept
    assert not slots.has_checkpoint(7) and slots.plan_checkpoint(7) == 1
    slots.step_done()
    assert slots.has_checkpoint(7) and slots.plan_checkpoint(7) is None


def test_the_least_recently_used_checkpoint_is_replaced_but_not_one_being_read():
    slots = StateSlots(num_seats=1, num_checkpoints=2)
    for prefix in (1, 2):
        slots.plan_checkpoint(prefix)
    slots.step_done()
    reading = slots.restore(1)  # 1 is now the most recent, and read by this step
    assert slots.plan_checkpoint(3) != reading
    assert not slots.has_checkpoint(2)  # replaced
    assert slots.plan_checkpoint(4) is None  # the only other one is being read
    slots.step_done()
    assert slots.has_checkpoint(1) and slots.has_checkpoint(3)


def test_preemption_gives_the_seat_back_and_the_recompute_starts_again():
    s = make(max_num_seqs=2, num_blocks=4, budget=64)  # 4 blocks of 4: two sequences of 8 fill the cache
    a, b = seq("a", range(8)), seq("b", range(50, 58))
    s.add(a)
    s.add(b)
    step(s)
    batch = step(s)  # both need a new block to decode: the newest is preempted
    assert batch.preempted == [b] and b.state_slot == -1 and b.num_computed_tokens == 0
