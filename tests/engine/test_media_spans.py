"""Pictures that attend both ways in a prefill (Gemma 3): a chunk never ends strictly inside a picture's run of image
tokens. The rules alone (media_spans.py), then the scheduler applying them to running and admitted sequences."""

from sagellm.runtime.engine.media_spans import chunk_runs, image_runs, whole_runs_chunk
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.multimodal.media_feature import MediaFeature


def picture(offset: int, length: int, modality: str = "image", name: bytes = b"picture") -> MediaFeature:
    return MediaFeature(modality, name, offset, length, None)


def prompt(request_id: str, tokens: list[int], *features: MediaFeature) -> Sequence:
    seq = Sequence(request_id, tokens, SamplingParams())
    seq.mm_features = list(features)
    return seq


def with_runs(n: int, *features: MediaFeature) -> Sequence:
    return prompt("a", list(range(n)), *features)


# The rules


def test_a_chunk_that_would_end_inside_a_run_ends_before_it() -> None:
    seq = with_runs(60, picture(10, 16))  # run [10, 26)
    assert whole_runs_chunk(seq, 0, 16, 16) == 10
    assert whole_runs_chunk(seq, 4, 10, 40) == 6


def test_a_chunk_that_starts_inside_a_run_is_stretched_to_its_end() -> None:
    """A prefix-cache hit that ended mid-picture: the rest of the run goes in one chunk, past what was proposed."""
    seq = with_runs(60, picture(10, 16))
    assert whole_runs_chunk(seq, 12, 4, 16) == 14
    assert whole_runs_chunk(seq, 10, 8, 16) == 16, "at the run's start: the whole run"


def test_a_stretch_the_budget_cannot_hold_waits() -> None:
    seq = with_runs(60, picture(10, 16))
    assert whole_runs_chunk(seq, 12, 4, 13) == 0
    assert whole_runs_chunk(seq, 10, 8, 15) == 0


def test_chunks_that_end_outside_every_run_are_untouched() -> None:
    seq = with_runs(60, picture(10, 16), picture(30, 8))
    assert whole_runs_chunk(seq, 0, 10, 16) == 10, "ending at a run's start"
    assert whole_runs_chunk(seq, 10, 16, 16) == 16, "ending at a run's end"
    assert whole_runs_chunk(seq, 0, 28, 40) == 28, "a run wholly inside"
    assert whole_runs_chunk(seq, 26, 3, 40) == 3, "between runs"
    assert whole_runs_chunk(seq, 40, 1, 1) == 1, "past the pictures (a decode)"
    assert whole_runs_chunk(seq, 12, 16, 40) == 16, "from inside one run past its end"


def test_the_second_run_a_chunk_would_split_is_the_one_cut_before() -> None:
    seq = with_runs(60, picture(10, 16), picture(30, 8))
    assert whole_runs_chunk(seq, 0, 33, 40) == 30
    assert whole_runs_chunk(seq, 26, 10, 40) == 4


def test_audio_clips_stay_causal() -> None:
    seq = with_runs(60, picture(10, 16, "audio"))
    assert image_runs(seq) == []
    assert whole_runs_chunk(seq, 0, 16, 16) == 16
    assert chunk_runs(seq, 0, 30) == []


def test_the_runs_a_chunk_overlaps_whole() -> None:
    seq = with_runs(60, picture(10, 16), picture(30, 8), picture(45, 5, "audio"))
    assert chunk_runs(seq, 0, 10) == []
    assert chunk_runs(seq, 0, 11) == [(10, 26)]
    assert chunk_runs(seq, 14, 12) == [(10, 26)], "started mid-run: the whole run, its cached part included"
    assert chunk_runs(seq, 10, 30) == [(10, 26), (30, 38)]
    assert chunk_runs(seq, 26, 4) == []
    assert chunk_runs(seq, 38, 22) == []


# The scheduler


def scheduler(budget: int = 16, block_size: int = 4, whole_media_runs: bool = True, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(4, budget, 256, 64, block_size, whole_media_runs=whole_media_runs, **config))


def step(s: Scheduler) -> dict[str, int]:
    """One step: each scheduled sequence's tokens, the sampled ones given a token."""
    batch = s.schedule()
    for sampled in s.complete_step(batch):
        sampled.append_token(7)
    return {seq.request_id: n for seq, n in zip(batch.seqs, batch.num_new_tokens)}


def test_the_scheduler_cuts_prefill_chunks_before_a_run() -> None:
    s = scheduler(budget=16)
    s.add(with_runs(40, picture(10, 16)))
    assert [step(s) for _ in range(3)] == [{"a": 10}, {"a": 16}, {"a": 14}]
    plain = scheduler(budget=16, whole_media_runs=False)
    plain.add(with_runs(40, picture(10, 16)))
    assert [step(plain) for _ in range(3)] == [{"a": 16}, {"a": 16}, {"a": 8}], "the flag off: chunks as before"


def test_a_picture_waits_for_a_step_with_room_for_it() -> None:
    """A decode takes a token of the budget first: the picture's 16 tokens no longer fit, so its prompt waits (its
    text before the picture still goes) until the decode is done."""
    s = scheduler(budget=16)
    d = prompt("d", [100, 101])
    s.add(d)
    assert step(s) == {"d": 2}
    s.add(with_runs(30, picture(4, 16)))
    assert step(s) == {"d": 1, "a": 4}
    assert step(s) == {"d": 1}
    s.finish(d, "stop")
    assert step(s) == {"a": 16}, "d finished: the whole run in one step"
    assert step(s) == {"a": 10}


def test_long_prefill_shares_are_cut_and_stretched_to_whole_runs() -> None:
    """Shares of 2 tokens (a long prompt's): cut before the run, then the run whole in one stretched chunk; a second
    prompt whose prefix-cache hit ends inside the same picture stretches its first chunk to the run's end."""
    shares = {"long_prefill_token_threshold": 2, "long_prefill_chunk_tokens": 2}
    s = scheduler(budget=16, block_size=4, **shares)
    first = list(range(16))
    a = prompt("a", first, picture(3, 8))  # run [3, 11)
    s.add(a)
    assert [step(s) for _ in range(3)] == [{"a": 2}, {"a": 1}, {"a": 8}]
    while a.num_output_tokens == 0:
        step(s)
    s.finish(a, "stop")  # its blocks stay in the prefix cache
    s.add(prompt("b", first[:11] + [200 + i for i in range(9)], picture(3, 8)))  # the same picture, then new text
    assert step(s) == {"b": 3}, "the hit ends at 8, mid-picture: stretched to 11"
    assert s.running[0].num_cached_tokens == 8
    assert step(s) == {"b": 2}
