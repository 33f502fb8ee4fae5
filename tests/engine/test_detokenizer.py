"""Incremental detokenization against a full `tokenizer.decode`, on real tokenizers of both byte-handling kinds.

Tokenizers: a GPT-2/SmolLM2-style byte-level BPE and a Llama-style SentencePiece BPE with byte fallback, both trained
here with `tokenizers`, plus the real SmolLM2 tokenizer (downloaded with the model: marked `network` and `slow`).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sagellm.runtime.engine.detokenizer import (
    PROMPT_CONTEXT_TOKENS,
    DetokenizerFinishedError,
    IncrementalDetokenizer,
    find_stop_string,
)
from sagellm.runtime.engine.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve résumé.",
    "你好，世界！这是一个测试。",
    "Emoji time 😀🎉 and more text.",
] * 4

TEXTS = [
    "Hello world, how are you?",
    "Café crème: naïve façade, Ångström, Straße.",
    "你好，世界！今天天气很好。日本語のテキスト。",
    "Party 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷 done.",
    "mixed: 猫 cat 😺 chat — «quotes» ✓ ∑ x² ½",
]


def _byte_level_bpe() -> PreTrainedTokenizerBase:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _byte_fallback_bpe() -> PreTrainedTokenizerBase:
    """Llama-style: '▁' word marks, and characters outside the (ASCII-trained) vocab as <0xXX> byte tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    ascii_corpus = [line for line in CORPUS if line.isascii()]
    tok.train_from_iterator(ascii_corpus, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


TOKENIZERS = {"byte_level": _byte_level_bpe, "byte_fallback": _byte_fallback_bpe}


@pytest.fixture(
    scope="module", params=[*TOKENIZERS, pytest.param("smollm2", marks=[pytest.mark.network, pytest.mark.slow])]
)
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2_dir"))
    return TOKENIZERS[request.param]()


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerBase:
    return _byte_level_bpe()


def _encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _decode(tok: PreTrainedTokenizerBase, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int] | None = None) -> list[str]:
    deltas, i = [], 0
    for size in chunk_sizes or [1] * len(ids):
        deltas.append(detok.add(ids[i : i + size]))
        i += size
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = _encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = _stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == _decode(tokenizer, ids) == detok.text


def test_texts_exercise_partial_characters(tokenizer: PreTrainedTokenizerBase) -> None:
    """Guards the test above: some single tokens must decode to U+FFFD, or the hold-back path went untested."""
    ids = [i for text in TEXTS for i in _encode(tokenizer, text)]
    assert any("\ufffd" in _decode(tokenizer, [i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_with_prompt_and_random_chunks(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    prompt = _encode(tokenizer, "A long prompt, with words before the answer: ")
    output = _encode(tokenizer, text)
    rng = random.Random(text)
    sizes: list[int] = []
    while sum(sizes) < len(output):
        sizes.append(min(rng.randint(1, 4), len(output) - sum(sizes)))
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = _stream(detok, output, sizes)
    expected = _decode(tokenizer, prompt + output)[len(_decode(tokenizer, prompt)) :]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == expected


def test_special_tokens_skipped_or_kept(byte_level: PreTrainedTokenizerBase) -> None:
    ids = _encode(byte_level, "Hi there") + [byte_level.eos_token_id] + _encode(byte_level, " more")
    skipping = IncrementalDetokenizer(byte_level, [], skip_special_tokens=True)
    keeping = IncrementalDetokenizer(byte_level, [], skip_special_tokens=False)
    assert "".join(_stream(skipping, ids)) == "Hi there more"
    assert "".join(_stream(keeping, ids)) == "Hi there<|endoftext|> more"


def test_trailing_incomplete_character_is_flushed_as_replacement(byte_level: PreTrainedTokenizerBase) -> None:
    ids = _encode(byte_level, "ok 😀")
    cut = next(n for n in range(1, len(ids)) if _decode(byte_level, ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(byte_level, [])
    streamed = "".join(_stream(detok, ids[:cut]))
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == _decode(byte_level, ids[:cut])


def test_work_per_token_does_not_grow(byte_level: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _encode(byte_level, " ".join(TEXTS) * 20)
    windows: list[int] = []
    decode = byte_level.decode

    def recording_decode(token_ids: list[int], **kwargs: object) -> str:
        windows.append(len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(byte_level, "decode", recording_decode)
    detok = IncrementalDetokenizer(byte_level, list(range(50)))
    _stream(detok, ids)
    assert len(ids) > 1000
    assert max(windows) <= PROMPT_CONTEXT_TOKENS + 8  # context tokens + the few tokens of one character


def test_find_stop_string() -> None:
    assert find_stop_string("abc STOP def", ["STOP"], 12, False) == ("STOP", 4)
    assert find_stop_string("abc STOP def", ["STOP"], 12, True) == ("STOP", 8)
    assert find_stop_string("abc STOP def", ["STOP"], 4, False) is None  # lies wholly in old text: seen before
    assert find_stop_string("abc STOP", ["STOP"], 1, False) == ("STOP", 4)  # straddles the previous end
    assert find_stop_string("x b a", ["a", "b"], 5, False) == ("b", 2)  # earliest start wins, not list order
    assert find_stop_string("xab", ["abc", "ab"], 3, True) == ("ab", 3)
    assert find_stop_string("xyz", ["q"], 3, False) is None


def _stop_stream(tok: PreTrainedTokenizerBase, text: str, params: SamplingParams) -> tuple[list[str], str, str | None]:
    detok = IncrementalDetokenizer.from_params(tok, [], params)
    deltas: list[str] = []
    for token in _encode(tok, text):
        deltas.append(detok.add([token]))
        if detok.stop_string is not None:
            break
    else:
        deltas.append(detok.flush())
    return deltas, detok.text, detok.stop_string


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_straddling_deltas(byte_level: PreTrainedTokenizerBase, include: bool) -> None:
    text, stop = "Hello world, this is a test.", "lo wor"
    tokens = [_decode(byte_level, [i]) for i in _encode(byte_level, text)]
    assert not any(stop in t for t in tokens)  # the stop string spans a token boundary
    params = SamplingParams(stop=[stop, "never"], include_stop_str_in_output=include)
    deltas, full, matched = _stop_stream(byte_level, text, params)
    expected = "Hello wor" if include else "Hel"
    assert matched == stop
    assert "".join(deltas) == full == expected


def test_earliest_of_several_stop_strings(byte_level: PreTrainedTokenizerBase) -> None:
    deltas, full, matched = _stop_stream(byte_level, "The quick brown fox", SamplingParams(stop=["fox", "quick"]))
    assert (matched, full, "".join(deltas)) == ("quick", "The ", "The ")


def test_stop_string_in_multibyte_text(byte_level: PreTrainedTokenizerBase) -> None:
    deltas, full, matched = _stop_stream(byte_level, "Party 😀🎉 done", SamplingParams(stop="🎉"))
    assert (matched, full, "".join(deltas)) == ("🎉", "Party 😀", "Party 😀")


def test_stream_holds_back_a_possible_stop_prefix(byte_level: PreTrainedTokenizerBase) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    detok = IncrementalDetokenizer(byte_level, [], stop=["xyz!"])  # never matches; holds back 3 characters
    streamed = ""
    for token in _encode(byte_level, text):
        streamed += detok.add([token])
        assert streamed == detok.text[: max(0, len(detok.text) - 3)]
    assert streamed + detok.flush() == text
    assert detok.flush() == ""


def test_included_stop_strings_hold_nothing_back(byte_level: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(byte_level, [], stop=["xyz!"], include_stop_str_in_output=True)
    streamed = "".join(detok.add([t]) for t in _encode(byte_level, "Hello world"))
    assert streamed == detok.text == "Hello world"


def test_add_after_stop_raises(byte_level: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(byte_level, [], stop=["world"])
    detok.add(_encode(byte_level, "Hello world and more"))
    assert detok.stop_string == "world" and detok.text == "Hello "
    with pytest.raises(DetokenizerFinishedError):
        detok.add(_encode(byte_level, "x"))


@pytest.mark.parametrize("text", TEXTS)
def test_a_resume_at_any_token_continues_the_text_exactly(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """A request resumed on another engine after k tokens: the first run streamed some text (holding back a character
    cut between tokens and a possible stop string's start); the second, given the prompt and those k tokens as
    `resumed_tokens`, streams the rest. Together: exactly the uninterrupted run's text, at every k."""
    prompt, output = _encode(tokenizer, "Answer: "), _encode(tokenizer, text)
    params = SamplingParams(stop=["xyz"])  # holds back 2 characters: the replay must hold back the same
    whole = IncrementalDetokenizer.from_params(tokenizer, prompt, params)
    expected = "".join(_stream(whole, output)) + whole.flush()
    for k in range(len(output) + 1):
        first = IncrementalDetokenizer.from_params(tokenizer, prompt, params)
        sent = "".join(_stream(first, output[:k]))
        second = IncrementalDetokenizer.from_params(tokenizer, prompt + output[:k], params, resumed_tokens=k)
        assert sent + "".join(_stream(second, output[k:])) + second.flush() == expected, f"resumed after {k} tokens"
