"""Chunking: every chunk is an exact slice of its document within the token budget, cuts fall at headings, then
paragraphs, then sentences (words, characters only when they must), consecutive chunks of a section overlap by a few
sentences, and the same input always gives the same chunks. Tokens here are words, so budgets are easy to read."""

from __future__ import annotations

import re

import pytest

from sagellm.runtime.rag import Chunk, chunk_document


def words(text: str) -> int:
    return len(text.split())


def sentences(count: int, start: int = 0) -> str:
    return " ".join(f"Sentence number {i} has exactly seven words." for i in range(start, start + count))


def check_chunks(document_id: str, text: str, chunks: list[Chunk], max_tokens: int) -> None:
    """What holds for every chunking: exact slices in order, ordinals 0.., within the budget, nothing left out."""
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    covered = set()
    for chunk in chunks:
        assert chunk.document_id == document_id
        assert text[chunk.start : chunk.end] == chunk.text == text[slice(*chunk.span)]
        assert chunk.text == chunk.text.strip() and chunk.text
        assert words(chunk.text) <= max_tokens
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, char in enumerate(text) if not char.isspace())
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


def test_a_short_document_is_one_chunk() -> None:
    text = "\n  A short note. It fits.\n\n"
    [chunk] = chunk_document("note", text, words)
    assert chunk == Chunk("note", 0, "A short note. It fits.", 3, 25)


def test_blank_text_has_no_chunks() -> None:
    assert chunk_document("empty", " \n\t\n", words) == []
    assert chunk_document("empty", "", words) == []


def test_paragraphs_are_packed_whole_while_they_fit() -> None:
    paragraphs = [sentences(2, 0), sentences(2, 2), sentences(2, 4), sentences(2, 6)]  # 14 words each
    text = "\n\n".join(paragraphs)
    chunks = chunk_document("doc", text, words, max_tokens=30, overlap_tokens=0)
    check_chunks("doc", text, chunks, 30)
    assert [c.text for c in chunks] == ["\n\n".join(paragraphs[:2]), "\n\n".join(paragraphs[2:])]


def test_a_paragraph_over_the_budget_is_cut_at_sentences_with_overlap() -> None:
    text = sentences(10)  # one paragraph of 70 words
    chunks = chunk_document("doc", text, words, max_tokens=30, overlap_tokens=10)
    check_chunks("doc", text, chunks, 30)
    assert len(chunks) > 2
    for previous, chunk in zip(chunks, chunks[1:]):
        assert chunk.text.startswith("Sentence number") and chunk.text.endswith(".")  # whole sentences
        shared = text[chunk.start : previous.end]
        assert previous.start < chunk.start < previous.end, "consecutive chunks share a sentence"
        assert words(shared) <= 10


def test_no_overlap_when_asked_for_none() -> None:
    text = sentences(10)
    chunks = chunk_document("doc", text, words, max_tokens=30, overlap_tokens=0)
    check_chunks("doc", text, chunks, 30)
    assert all(previous.end < chunk.start for previous, chunk in zip(chunks, chunks[1:]))


def test_a_heading_starts_a_chunk_and_stays_with_its_text() -> None:
    text = f"# Guide\n\n## Setup\n{sentences(1)}\n\n## Play\n{sentences(1, 1)}\n### Scoring\n{sentences(1, 2)}\n"
    chunks = chunk_document("guide", text, words, max_tokens=100)
    check_chunks("guide", text, chunks, 100)
    assert [c.text.split("\n")[0] for c in chunks] == ["# Guide", "## Play", "### Scoring"]
    assert chunks[0].text == f"# Guide\n\n## Setup\n{sentences(1)}"  # the title stays with the first section
    assert all(c.text.count("Sentence") == 1 for c in chunks), "no overlap across a heading"


def test_a_heading_is_never_a_chunk_alone() -> None:
    text = f"## Rules\n{sentences(4)}"  # the paragraph fits alone (28 words) but not with the heading
    chunks = chunk_document("rules", text, words, max_tokens=28, overlap_tokens=0)
    check_chunks("rules", text, chunks, 28)
    assert chunks[0].text == f"## Rules\n{sentences(3)}"
    assert chunks[1].text == sentences(1, 3)


def test_a_hash_inside_a_code_block_is_no_heading() -> None:
    text = "Run this:\n\n```\n# install first\n\npip install sagellm\n```\n\nThen serve."
    chunks = chunk_document("howto", text, words, max_tokens=100)
    assert [c.text for c in chunks] == [text]


def test_a_sentence_over_the_budget_is_cut_at_words_and_a_word_at_characters() -> None:
    text = " ".join(f"word{i}" for i in range(25))  # no sentence end: 25 words in one sentence
    chunks = chunk_document("run-on", text, words, max_tokens=10, overlap_tokens=0)
    check_chunks("run-on", text, chunks, 10)
    assert [words(c.text) for c in chunks] == [10, 10, 5]

    url = "https://example.com/" + "a" * 100
    by_characters = chunk_document("url", url, lambda t: len(t) // 16 + 1, max_tokens=4, overlap_tokens=0)
    assert "".join(c.text for c in by_characters) == url
    assert all(len(c.text) // 16 + 1 <= 4 for c in by_characters)


def test_the_same_input_gives_the_same_chunks() -> None:
    text = f"# A\n{sentences(9)}\n\n## B\n{sentences(6, 9)}\n\n{sentences(5, 15)}"
    first = chunk_document("doc", text, words, max_tokens=25, overlap_tokens=8)
    check_chunks("doc", text, first, 25)
    assert chunk_document("doc", text, words, max_tokens=25, overlap_tokens=8) == first


@pytest.mark.parametrize(
    "max_tokens, overlap_tokens, message",
    [
        (0, 0, "max_tokens must be at least 1, not 0"),
        (10, 10, "overlap_tokens must be in [0, max_tokens=10), not 10"),
        (10, -1, "overlap_tokens must be in [0, max_tokens=10), not -1"),
    ],
)
def test_budgets_that_make_no_sense_are_refused(max_tokens: int, overlap_tokens: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        chunk_document("doc", "text", words, max_tokens=max_tokens, overlap_tokens=overlap_tokens)


def test_a_budget_below_the_counters_special_tokens_is_refused() -> None:
    with_cls_and_sep = lambda text: len(text.split()) + 2  # noqa: E731
    with pytest.raises(ValueError, match=r"max_tokens=2 is less than the tokens of the single character 'a'"):
        chunk_document("doc", "a b c", with_cls_and_sep, max_tokens=2, overlap_tokens=0)
