"""The generation prompt of a retrieval-augmented answer: the retrieved chunks as numbered sources the model must
answer from and cite, in OpenAI chat `messages`, and the list of those sources to return beside the answer.

Three steps, each a function, so a caller can log or show what happens between them: `select_sources` keeps the
best hits that fit a token budget (a small model's context is short: SmolLM2-135M has 8,192 tokens, and a prompt
near the limit leaves no room to answer), `build_messages` numbers them in a system message before the question,
and `cited_sources` says which chunk each number stands for, so "[2]" in the answer can be traced to a document and
the span of its text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagellm.common.errors import InvalidInput
from sagellm.runtime.rag.chunking import TokenCounter
from sagellm.runtime.rag.index import Hit

DEFAULT_MAX_SOURCE_TOKENS = 1500
INSTRUCTION = (
    "Answer the user's question using only the numbered sources below. Cite each source you use by its number in "
    "square brackets, like [1]. If the sources do not contain the answer, say that you do not know."
)
NO_SOURCES = "(no sources were found)"


def select_sources(
    hits: Sequence[Hit], count_tokens: TokenCounter, *, max_tokens: int = DEFAULT_MAX_SOURCE_TOKENS
) -> list[Hit]:
    """The hits to put in the prompt: in the order given (a search's, best first), each one whose numbered source
    text still fits in `max_tokens` with those before it; a hit too long for what is left is skipped."""
    if max_tokens < 1:
        raise InvalidInput(f"max_tokens must be at least 1, not {max_tokens}")
    chosen: list[Hit] = []
    used = 0
    for hit in hits:
        tokens = count_tokens(_source_text(len(chosen) + 1, hit))
        if used + tokens <= max_tokens:
            chosen.append(hit)
            used += tokens
    return chosen


def build_messages(question: str, sources: Sequence[Hit]) -> list[dict[str, str]]:
    """OpenAI chat messages: a system message with the instruction and the sources numbered from [1], then the
    question as the user's message. With no sources the model is told so, and the instruction has it say it does
    not know."""
    if not question.strip():
        raise InvalidInput("the question is empty")
    numbered = "\n\n".join(_source_text(number, hit) for number, hit in enumerate(sources, start=1))
    return [
        {"role": "system", "content": f"{INSTRUCTION}\n\nSources:\n\n{numbered or NO_SOURCES}"},
        {"role": "user", "content": question.strip()},
    ]


def cited_sources(sources: Sequence[Hit]) -> list[dict[str, object]]:
    """What each source number in the prompt stands for, JSON-ready: its number, document id, the chunk's ordinal
    and character span in that document, and its similarity score."""
    return [
        {
            "number": number,
            "document_id": hit.chunk.document_id,
            "ordinal": hit.chunk.ordinal,
            "start": hit.chunk.start,
            "end": hit.chunk.end,
            "score": hit.score,
        }
        for number, hit in enumerate(sources, start=1)
    ]


def _source_text(number: int, hit: Hit) -> str:
    return f"[{number}] (from {hit.chunk.document_id})\n{hit.chunk.text}"


def source_budget(max_model_len: int | None, most: int = DEFAULT_MAX_SOURCE_TOKENS) -> int:
    """Tokens of sources a prompt may hold: `most`, and at most half the served model's context, so the
    instruction, the question and the answer keep the other half."""
    return min(most, max_model_len // 2) if max_model_len else most


def question_of(messages: Sequence[dict[str, Any]] | None, prompt: str | None = None) -> str:
    """What a request asks: its last user message with text content, else its prompt, stripped ("" for none)."""
    for message in reversed(messages or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"].strip()
    return (prompt or "").strip()


def served_token_counter(tokenizer: Any) -> TokenCounter:
    """Tokens of the model that will read the prompt (its tokenizer's `encode`); words where there is none."""
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer.encode(text))


def grounded(
    question: str, hits: Sequence[Hit], count_tokens: TokenCounter, max_tokens: int
) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """The three steps at once: the chat messages asking `question` from the hits that fit `max_tokens`, and what
    each source number in them stands for."""
    sources = select_sources(hits, count_tokens, max_tokens=max_tokens)
    return build_messages(question, sources), cited_sources(sources)
