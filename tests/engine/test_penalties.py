"""Penalties, biases and token restrictions as vLLM v1 applies them: the adjusted logits equal a plain per-row
reference of its formulas, in a batch where some rows set none; through the engine, repetition penalty with greedy
decoding equals transformers' `generate`, min_tokens holds EOS and the stop ids back, a +100 bias wins, bad words and
tokens not allowed never come, and a seeded request draws the same tokens alone and in a batch. The values are
checked where they are given, naming the field; every list is capped (`request_limits`), and bad words are tokenized
and matched in linear time."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM

from sagellm import LLM, SamplingParams
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.engine.penalties import BadWords, adjust_logits, bad_word_token_ids
from sagellm.runtime.engine.prompt import sampling_token_problem
from sagellm.runtime.engine.request_limits import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)
from sagellm.runtime.engine.sampler import Sampler
from sagellm.runtime.pipeline.messages import Request
from tests.oracle import ENGINE_BACKEND, random_prompts, run_to_end
from tests.tiny_models import EOS_ID, make_tiny_llama

VOCAB = 64
EOS = {VOCAB - 1}


@dataclass
class History:
    prompt: list[int]
    output: list[int]
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    resumed: int = 0  # the prompt's last tokens that are output of an earlier run

    @property
    def token_ids(self) -> list[int]:
        return self.prompt + self.output

    @property
    def bad_words(self) -> BadWords | None:
        return BadWords(self.bad_words_token_ids) if self.bad_words_token_ids else None

    @property
    def output_start(self) -> int:
        return len(self.prompt) - self.resumed

    @property
    def num_output_tokens(self) -> int:
        return len(self.output)


def reference(row: torch.Tensor, p: SamplingParams, h: History) -> torch.Tensor:
    """vLLM v1's processors on one row, one token at a time, in its order."""
    x = row.clone()
    output = h.token_ids[h.output_start :]
    if p.allowed_token_ids is not None:
        x = torch.where(torch.isin(torch.arange(len(x)), torch.tensor(p.allowed_token_ids)), x, -math.inf)
    for word in h.bad_words_token_ids:
        prefix = word[:-1]
        if len(prefix) <= len(output) and output[len(output) - len(prefix) :] == prefix:
            x[word[-1]] = -math.inf
    if h.num_output_tokens < p.min_tokens:
        for token in EOS | set(p.stop_token_ids):
            if token < len(x):  # one beyond the vocabulary can never be chosen anyway
                x[token] = -math.inf
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    for token in set(h.token_ids):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(output):
        x[token] = x[token] - p.frequency_penalty * output.count(token) - p.presence_penalty
    return x


def _history(g: torch.Generator, params: SamplingParams, resumed: int = 0) -> History:
    """Random tokens, from few ids so they repeat; bad words' token ids as the engine gives them to a row with
    bad_words (one of them always matching the end of a non-empty output)."""
    prompt = torch.randint(0, 12, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
    output = torch.randint(0, 12, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g).tolist()
    words = [[3], [4, 5], [5, 6, 7], [output[-1] if output else 8, 9]] if params.bad_words else []
    return History(prompt, output, words, resumed)


EACH = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=-0.7),
    "repetition": dict(repetition_penalty=1.8),
    "repetition below 1": dict(repetition_penalty=0.6),
    "logit_bias": dict(logit_bias={1: 3.0, 7: -50.0, 9: 0.5}),
    "min_tokens": dict(min_tokens=12, stop_token_ids=[5, 200]),  # 200: beyond the vocabulary, never chosen anyway
    "bad_words": dict(bad_words=["x"]),  # the rows' bad_words_token_ids stand for what the engine tokenizes
    "allowed": dict(allowed_token_ids=[2, 4, 9, 11]),
}
ALL = {k: v for kwargs in EACH.values() for k, v in kwargs.items()} | dict(repetition_penalty=1.3)


@pytest.mark.parametrize("kwargs", [*EACH.values(), ALL], ids=[*EACH, "all"])
def test_adjusted_logits_equal_the_reference_with_rows_that_set_none(kwargs) -> None:
    g = torch.Generator().manual_seed(0)
    rows = 12
    logits = torch.randn(rows, VOCAB, generator=g) * 3
    params = [SamplingParams(**kwargs) if i % 3 else SamplingParams() for i in range(rows)]
    histories = [_history(g, p, resumed=i % 4) for i, p in enumerate(params)]
    adjusted = adjust_logits(logits.clone(), params, histories, EOS)
    expected = torch.stack([reference(logits[i], params[i], histories[i]) for i in range(rows)])
    torch.testing.assert_close(adjusted, expected)
    assert torch.equal(adjusted[::3], logits[::3])  # the rows that set none


def test_sampler_chooses_from_the_adjusted_logits_and_returns_raw_logprobs() -> None:
    g = torch.Generator().manual_seed(1)
    rows = 8
    logits = torch.randn(rows, VOCAB, generator=g)
    before = logits.clone()
    params = [SamplingParams(temperature=0, logprobs=2, **(ALL if i % 2 else {})) for i in range(rows)]
    histories = [_history(g, p) for p in params]
    out = Sampler(EOS).sample(logits, params, [None] * rows, histories)
    expected = [int(reference(logits[i], params[i], histories[i]).argmax()) for i in range(rows)]
    assert out.token_ids == expected
    raw = torch.log_softmax(logits, -1)
    assert [lp.logprob for lp in out.logprobs] == pytest.approx([float(raw[i, t]) for i, t in enumerate(expected)])
    assert torch.equal(logits, before)


def test_greedy_batches_without_penalties_keep_the_one_argmax() -> None:
    logits = torch.randn(4, VOCAB)
    assert Sampler().sample(logits, [SamplingParams(temperature=0)] * 4, [None] * 4).token_ids == (
        logits.argmax(-1).tolist()
    )
    with pytest.raises(ValueError, match="token history"):
        Sampler().sample(logits, [SamplingParams(temperature=0, min_tokens=1)] * 4, [None] * 4)


def test_values_are_checked_naming_the_field() -> None:
    bad = {
        "presence_penalty": 3,
        "frequency_penalty": -2.5,
        "repetition_penalty": 0,
        "min_tokens": -1,
        "bad_words": [" "],
        "allowed_token_ids": [],
        "logit_bias": {"one": 1.0},
    }
    for name, value in bad.items():
        with pytest.raises(FieldError, match=f"^{name} must") as error:
            SamplingParams(**{name: value})
        assert error.value.field == name
    with pytest.raises(FieldError, match=r"min_tokens must be <= max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(FieldError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=math.inf)
    params = SamplingParams(logit_bias={"5": 300, 6: -1000.0, "7": 2})
    assert params.logit_bias == {5: 100.0, 6: -100.0, 7: 2.0}  # OpenAI's string keys, clamped as OpenAI's
    assert not SamplingParams().adjusts_logits and not SamplingParams(logit_bias={}).adjusts_logits
    assert sampling_token_problem(SamplingParams(logit_bias={64: 1}), VOCAB).startswith("logit_bias must")
    assert sampling_token_problem(SamplingParams(allowed_token_ids=[1, 99]), VOCAB).startswith("allowed_token_ids")
    assert sampling_token_problem(SamplingParams(logit_bias={63: 1}, allowed_token_ids=[0]), VOCAB) is None
    tokenized = SamplingParams(bad_words=["x"], bad_words_token_ids=[[3, 64]])  # tokenized for another vocabulary
    assert sampling_token_problem(tokenized, VOCAB).startswith("bad_words must name token ids")


def test_bad_words_are_tokenized_and_matched_in_linear_time() -> None:
    """Thousands of distinct words (vLLM's quadratic dedup took seconds for a few thousand), each tokenized alone and
    after a space, the same sequence once; the index answers what the output so far bans with a few lookups."""

    class Letters:  # a character per token: "ab" -> [1, 2], " ab" -> [0, 1, 2]
        def encode(self, text: str, add_special_tokens: bool) -> list[int]:
            return [0 if c == " " else ord(c) - ord("a") + 1 for c in text]

    words = [a + b + c for a in "abcdefghijklmnop" for b in "abcdefghijklmnop" for c in "abcdefghijklmnop"]  # 4,096
    started = time.perf_counter()
    sequences = bad_word_token_ids(Letters(), [*words, *words, " abc"], vocab_size=27)
    assert time.perf_counter() - started < 2.0  # ~0.05 s; the quadratic dedup took minutes
    assert len(sequences) == 2 * len(words) and [1, 2, 3] in sequences and [0, 1, 2, 3] in sequences
    assert sorted(BadWords(sequences).banned([9, 9, 1, 2], output_start=2)) == list(range(1, 17))  # "ab?" each
    index = BadWords(bad_word_token_ids(Letters(), ["abc", "bd"], vocab_size=27))
    assert index.banned([9, 9, 1, 2], output_start=2) == {3, 4}  # "ab" ends the output: "abc" would complete it
    assert index.banned([9, 9, 0, 1], output_start=2) == set()  # " a": no word's last token would complete it
    assert index.banned([9, 1, 2], output_start=2) == {4}  # "ab" straddles the prompt: not the output's; "b" is
    assert BadWords([[5], [6, 7]]).banned([6], output_start=1) == {5}  # a one-token word is always banned


def test_every_list_field_is_capped_by_its_size_before_its_items_are_read() -> None:
    capped = {
        "stop": (["s"] * (MAX_STOP_STRINGS + 1), "strings"),
        "stop_token_ids": ([1] * (MAX_STOP_TOKEN_IDS + 1), "token ids"),
        "bad_words": (["w"] * (MAX_BAD_WORDS + 1), "words"),
        "logit_bias": ({i: 1.0 for i in range(MAX_LOGIT_BIAS_TOKENS + 1)}, "token ids"),
        "allowed_token_ids": ([1] * (MAX_ALLOWED_TOKEN_IDS + 1), "token ids"),
    }
    for name, (value, what) in capped.items():
        with pytest.raises(FieldError, match=f"^{name} must hold at most .* {what}, got {len(value)}$") as error:
            SamplingParams(**{name: value})
        assert error.value.field == name
        at_cap = value[:-1] if isinstance(value, list) else dict(list(value.items())[:-1])
        SamplingParams(**{name: at_cap})  # the cap itself is taken
    with pytest.raises(FieldError, match=f"^stop must hold at most {MAX_STOP_CHARS} characters per string"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])
    with pytest.raises(FieldError, match=f"^bad_words must hold at most {MAX_BAD_WORD_CHARS} characters per word"):
        SamplingParams(bad_words=["x" * (MAX_BAD_WORD_CHARS + 1)])
    with pytest.raises(FieldError, match=r"\.\.\. \(\d+ characters\)$"):  # a refused list is shown cut short
        SamplingParams(stop_token_ids=[1] * 999 + [-1])


def test_the_fields_cross_the_wire() -> None:
    sampling = SamplingParams(logit_bias={7: 1.5}, bad_words=["a b"], allowed_token_ids=[7], min_tokens=2)
    request = Request(request_id="r", prompt="hi", sampling=sampling)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=Request)
    assert decoded.sampling == sampling and decoded.sampling.logit_bias == {7: 1.5}


# -- through the engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("penalties") / "llama")
    llm = LLM(str(path), backend=ENGINE_BACKEND, block_size=4, num_kv_blocks=128)
    return path, llm


def test_greedy_repetition_penalty_equals_transformers_generate(tiny) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor is vLLM's formula (score < 0: times the penalty, else divided)
    over prompt and output; min_new_tokens is min_tokens (EOS -inf until then)."""
    path, llm = tiny
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [p + p[:4] for p in random_prompts(hf.config.vocab_size, [6, 11, 3], seed=3)]  # repeats in the prompt
    n = 16
    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, repetition_penalty=1.6)
    outs = llm.generate(prompts, params)
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            generated = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                repetition_penalty=1.6,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=EOS_ID,
            )
        assert out.outputs[0].token_ids == generated[0, len(prompt) :].tolist()
    assert any(o.outputs[0].token_ids != u.outputs[0].token_ids for o, u in zip(outs, plain))


def test_min_tokens_holds_eos_and_stop_ids_back(tiny) -> None:
    _, llm = tiny
    eos_first = SamplingParams(temperature=0, max_tokens=20, min_tokens=5, logit_bias={EOS_ID: 100})
    (out,) = llm.generate(["Hello world"], eos_first)
    assert out.outputs[0].token_ids[5:] == [EOS_ID] and EOS_ID not in out.outputs[0].token_ids[:5]
    assert out.outputs[0].finish_reason == "stop"
    stop = SamplingParams(temperature=0, max_tokens=20, min_tokens=3, stop_token_ids=[40], logit_bias={40: 100})
    (out,) = llm.generate(["Hello world"], stop)
    assert out.outputs[0].token_ids == out.outputs[0].token_ids[:3] + [40] and 40 not in out.outputs[0].token_ids[:3]
    ignoring = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, ignore_eos=True, logit_bias={EOS_ID: 100})
    (out,) = llm.generate(["Hello world"], ignoring)
    assert EOS_ID not in out.outputs[0].token_ids  # min_tokens holds EOS back even with ignore_eos


def test_a_bias_of_100_wins_greedy(tiny) -> None:
    _, llm = tiny
    (out,) = llm.generate(["The quick"], SamplingParams(temperature=0, max_tokens=6, logit_bias={"77": 100}))
    assert out.outputs[0].token_ids == [77] * 6


def test_bad_words_never_come(tiny) -> None:
    _, llm = tiny
    prompts = ["The quick brown", "Hello world! How", "A tokenizer splits"]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = llm.generate(prompts, greedy)
    # words the model says unconstrained: the text of a first token, and of two tokens of another reply
    first, second = plain[0].outputs[0].token_ids, plain[1].outputs[0].token_ids
    words = [llm.tokenizer.decode(first[:1]), llm.tokenizer.decode(second[1:3])]
    vocab = llm.engine.model.config.vocab_size
    banned = bad_word_token_ids(llm.tokenizer, words, vocab)
    assert [first[0]] in banned and second[1:3] in banned  # both come unconstrained; the second has two tokens
    for params in (greedy, SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)):
        for out in llm.generate(prompts, dataclasses.replace(params, bad_words=words)):
            tokens = out.outputs[0].token_ids
            for word in banned:
                assert all(tokens[i : i + len(word)] != word for i in range(len(tokens))), (word, tokens)


def test_only_allowed_tokens_come(tiny) -> None:
    _, llm = tiny
    allowed = [10, 20, 30, 40]
    for temperature in (0, 1.0):
        params = SamplingParams(temperature=temperature, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed)
        for out in llm.generate(["Hello", "Numbers like"], params):
            assert set(out.outputs[0].token_ids) <= set(allowed)


def test_a_seeded_penalized_request_draws_the_same_alone_and_in_a_batch(tiny) -> None:
    _, llm = tiny
    seeded = SamplingParams(
        temperature=0.9, top_p=0.95, seed=42, max_tokens=16, ignore_eos=True,
        repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, logit_bias={50: 2.0},
    )  # fmt: skip
    (alone,) = llm.generate(["The quick brown fox"], seeded)
    others = [
        SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=9),
    ]
    batch = llm.generate(["Hello world", "The quick brown fox", "A tokenizer"], [others[0], seeded, others[1]])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_field(tiny) -> None:
    _, llm = tiny
    vocab = llm.engine.model.config.vocab_size
    with pytest.raises(InvalidInput, match="^logit_bias must"):
        llm.generate(["Hello"], SamplingParams(max_tokens=2, logit_bias={vocab: 1.0}))
    with pytest.raises(InvalidInput, match="^allowed_token_ids must"):
        llm.generate(["Hello"], SamplingParams(max_tokens=2, allowed_token_ids=[0, vocab + 5]))


def test_a_resumed_request_is_penalized_as_if_it_had_not_stopped(tiny) -> None:
    """A resume's prompt ends with the tokens generated so far: they count as output (frequency, presence, bad
    words), as on the engine that generated them, while min_tokens and max_tokens count what is left. Penalties
    that favour the output's tokens make it matter: taken as prompt, the same tokens would give another reply."""
    _, llm = tiny
    favoured = dict(frequency_penalty=-0.5, presence_penalty=-1.5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **favoured)
    prompt = llm.tokenizer.encode("The quick brown")
    (whole,) = llm.generate([prompt], params)
    tokens = whole.outputs[0].token_ids
    rest = dataclasses.replace(params, max_tokens=7)
    llm.engine.add_request("resumed", prompt + tokens[:5], rest, resumed_tokens=5)
    llm.engine.add_request("as prompt", prompt + tokens[:5], rest)
    replies = run_to_end(llm.engine)
    assert replies["resumed"] == tokens[5:] and replies["as prompt"] != tokens[5:]
