"""Scheduler: token budget, decodes first, chunked prefill, max running, preemption by recompute."""

from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=4, budget=16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 256, num_blocks, block_size))


def seq(request_id: str, n: int, start: int = 0) -> Sequence:
    return Sequence(request_id, list(range(start, start + n)), SamplingParams())


def step(s: Scheduler, sample_token: int = 1):
    batch = s.schedule()
    for sampled in s.complete_step(batch):
        sampled.append_token(sample_token)
    return batch


def test_long_prompt_is_chunked_under_the_budget():
    s = make(budget=16)
    a = seq("a", 40)
    s.add(a)
    assert step(s).num_new_tokens == [16]
    assert step(s).num_new_tokens == [16]
    assert a.num_output_tokens == 0
    assert step(s).num_new_tokens == [8]
    assert a.num_output_tokens == 1  # sampled when the last prompt token was computed


def test_decodes_come_first_and_prefill_fills_the_rest():
    s = make(budget=16)
    a = seq("a", 4)
    s.add(a)
    step(s)
    b = seq("b", 30, start=100)
    s.add(b)
    batch = step(s)
    assert [x.request_id for x in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 15]
    assert batch.num_decodes == 1


def test_max_num_seqs_caps_the_running_batch():
    s = make(max_num_seqs=2, budget=64)
    for i in range(3):
        s.add(seq(str(i), 4, start=10 * i))
    batch = step(s)
    assert [x.request_id for x in batch.seqs] == ["0", "1"]
    assert len(s.waiting) == 1


def test_preemption_frees_the_newest_and_it_recomputes_later():
    # 4 blocks of 4 tokens; two sequences of 8 tokens fill the cache, then both need a new block to decode.
    s = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq("a", 8), seq("b", 8, start=50)
    s.add(a)
    s.add(b)
    step(s)
    assert a.num_output_tokens == b.num_output_tokens == 1
    batch = step(s)
    assert batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert [x.request_id for x in batch.seqs] == ["a"]
    s.finish(a, "stop")
    batch = step(s)
    # prompt + output token = 9 to recompute; its first block is still in the prefix cache (its tail was reused)
    assert batch.seqs == [b] and batch.num_new_tokens == [5]
    assert b.num_preemptions == 1


def test_finish_releases_blocks():
    s = make()
    a = seq("a", 10)
    s.add(a)
    step(s)
    free_before = s.block_manager.num_free_blocks
    s.finish(a, "length")
    assert s.block_manager.num_free_blocks == free_before + 3
    assert not s.has_unfinished()
