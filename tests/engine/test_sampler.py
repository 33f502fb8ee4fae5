"""The batched sampler: greedy is argmax, filters keep exactly the right tokens, draws follow the distribution, seeds
reproduce whatever shares the batch, and logprobs are log_softmax of the raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from sagellm.runtime.engine.sampler import TOP_P_CANDIDATES, Sampler, make_generator, mask_top_k_top_p
from sagellm.runtime.engine.sampling_params import SamplingParams

VOCAB = 64


@pytest.fixture(autouse=True)
def _fixed_global_rng() -> None:
    torch.manual_seed(0)


def _sample(logits: torch.Tensor, params: list[SamplingParams], generators: list | None = None) -> list[int]:
    return Sampler().sample(logits, params, generators or [None] * len(params)).token_ids


def _support(logits_row: list[float], params: SamplingParams, draws: int = 4000) -> set[int]:
    """The set of tokens drawn from one row repeated `draws` times (one batched call)."""
    logits = torch.tensor([logits_row] * draws)
    return set(_sample(logits, [params] * draws))


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, VOCAB)
    assert _sample(logits, [SamplingParams(temperature=0)] * 8) == logits.argmax(-1).tolist()


def test_greedy_rows_in_a_mixed_batch_are_argmax() -> None:
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, logprobs=1 if i == 3 else None) for i in range(6)]
    out = _sample(logits, params)
    assert [out[i] for i in (1, 3, 5)] == logits.argmax(-1)[[1, 3, 5]].tolist()


def test_sampler_leaves_logits_untouched() -> None:
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    _sample(logits, [SamplingParams(temperature=0.5, top_k=5, top_p=0.9, min_p=0.1)] * 4)
    assert torch.equal(logits, before)


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(16, VOCAB)
    assert _sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 16) == logits.argmax(-1).tolist()


def test_temperature_draws_follow_softmax() -> None:
    row, temperature, draws = [1.0, 0.5, 0.0, -1.0], 0.7, 20000
    tokens = _sample(torch.tensor([row] * draws), [SamplingParams(temperature=temperature)] * draws)
    observed = torch.bincount(torch.tensor(tokens), minlength=4).double()
    expected = torch.softmax(torch.tensor(row, dtype=torch.float64) / temperature, -1) * draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 16.27  # 3 degrees of freedom, p = 0.001


def test_top_k_keeps_exactly_k() -> None:
    row = [0.0, 3.0, 1.0, 2.5, -1.0, 2.0, 0.5]
    assert _support(row, SamplingParams(top_k=3)) == {1, 3, 5}
    assert _support(row, SamplingParams(top_k=-1)) == set(range(7))


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    row = [math.log(p) for p in (0.05, 0.4, 0.25, 0.2, 0.1)]
    assert _support(row, SamplingParams(top_p=0.7)) == {1, 2, 3}  # 0.4 + 0.25 < 0.7 <= 0.4 + 0.25 + 0.2
    assert _support(row, SamplingParams(top_p=0.3)) == {1}
    assert _support(row, SamplingParams(top_p=1.0)) == set(range(5))


def test_top_p_applies_after_temperature_and_top_k() -> None:
    row = [math.log(p) for p in (0.05, 0.4, 0.25, 0.2, 0.1)]
    # top_k=2 renormalizes to 0.4/0.65 = 0.615 and 0.385: top_p=0.6 then keeps only token 1.
    assert _support(row, SamplingParams(top_k=2, top_p=0.6)) == {1}
    # temperature 0.5 squares and renormalizes (0.16, 0.0625, 0.04, ...)/0.275: token 1 alone has 0.58.
    assert _support(row, SamplingParams(temperature=0.5, top_p=0.55)) == {1}


def _reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Top-k then top-p by a full float64 sort: the textbook definition."""
    order = torch.argsort(row.double(), descending=True)[:k]
    probs = torch.softmax(row.double()[order], -1)
    mass_before = torch.cumsum(probs, -1) - probs
    return set(order[mass_before < p].tolist())


def test_top_k_top_p_mask_matches_full_sort_on_a_large_vocab() -> None:
    vocab = 4 * TOP_P_CANDIDATES
    peaked, flat = torch.randn(vocab) * 4, torch.randn(vocab) * 0.01  # flat: the nucleus is wider than the candidates
    rows = [(peaked, vocab, 0.9), (flat, vocab, 0.9), (peaked, 40, 0.8), (flat, 2000, 0.5), (peaked, 7, 1.0)]
    rows += [(flat, vocab, 1.0)]
    x = torch.stack([r for r, _, _ in rows])
    masked = mask_top_k_top_p(x, [k for _, k, _ in rows], [p for _, _, p in rows])
    for i, (row, k, p) in enumerate(rows):
        assert set(torch.nonzero(masked[i] > -math.inf).flatten().tolist()) == _reference_keep(row, k, p)
        assert torch.equal(masked[i][masked[i] > -math.inf], row[masked[i] > -math.inf])
    assert len(_reference_keep(flat, vocab, 0.9)) > TOP_P_CANDIDATES  # the widening path really ran


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    row = [math.log(p) for p in (0.05, 0.4, 0.25, 0.2, 0.1)]
    assert _support(row, SamplingParams(min_p=0.3)) == {1, 2, 3}  # threshold 0.12
    assert _support(row, SamplingParams(min_p=0.6)) == {1, 2}  # threshold 0.24


def test_rows_get_their_own_filters() -> None:
    row = [math.log(p) for p in (0.05, 0.4, 0.25, 0.2, 0.1)]
    params = [SamplingParams(top_p=0.3), SamplingParams(top_k=3), SamplingParams(min_p=0.6), SamplingParams()] * 1000
    tokens = _sample(torch.tensor([row] * len(params)), params)
    supports = [set(tokens[i::4]) for i in range(4)]
    assert supports == [{1}, {1, 2, 3}, {1, 2}, set(range(5))]


def test_seeded_row_reproducible_whatever_the_batch() -> None:
    steps = [torch.randn(1, VOCAB) for _ in range(20)]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(batch_size: int, position: int) -> list[int]:
        generator, others = make_generator(1234), [make_generator(7), None, make_generator(99)]
        tokens = []
        for step in steps:
            logits = torch.randn(batch_size, VOCAB)
            logits[position] = step[0]
            params = [SamplingParams(temperature=0.8, top_k=10)] * batch_size
            params[position] = seeded
            generators = [others[i % 3] for i in range(batch_size)]
            generators[position] = generator
            tokens.append(_sample(logits, params, generators)[position])
        return tokens

    alone = run(1, 0)
    assert run(5, 3) == alone
    assert run(3, 0) == alone
    assert len(set(alone)) > 1  # actually random, not collapsed to argmax


def test_different_seeds_differ_and_none_is_unseeded() -> None:
    logits = torch.zeros(1, 1000)

    def draws(seed: int | None) -> list[int]:
        generator = make_generator(seed)
        return [_sample(logits, [SamplingParams(seed=seed)], [generator])[0] for _ in range(10)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert make_generator(None) is None


def test_logprobs_are_raw_log_softmax_with_top_n_in_order() -> None:
    logits = torch.randn(4, VOCAB)
    params = [
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=0.5, top_k=3, logprobs=0),
        SamplingParams(temperature=2.0),
        SamplingParams(temperature=1.0, logprobs=20),
    ]
    out = Sampler().sample(logits, params, [None] * 4)
    expected = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for row in (0, 1, 3):
        entry = out.logprobs[row]
        assert entry is not None and entry.token_id == out.token_ids[row]
        assert entry.logprob == pytest.approx(expected[row, entry.token_id].item(), abs=1e-6)
        values, ids = torch.topk(expected[row], params[row].logprobs or 0)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-6)
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    assert out.logprobs[1] is not None and out.logprobs[1].top == []


def test_mismatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        Sampler().sample(torch.randn(2, VOCAB), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(torch.randn(VOCAB), [SamplingParams()], [None])


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    """Found by the API fuzzer: top_p=1.46e-213 is valid, but 0 in float32; the sampler must still keep one token."""
    logits = torch.tensor([[0.1, 2.0, 0.3, -1.0]])
    params = SamplingParams(temperature=1.0, top_p=1.4579910458286498e-213)
    assert Sampler().sample(logits, [params], [None]).token_ids == [1]
