"""Chunking: a document's text cut into pieces an embedding model takes whole, each able to say where it came from.

An encoder embeds at most a few hundred tokens (all-MiniLM-L6-v2: 256) and a vector of a shorter, single-topic text
retrieves better than one of a whole page, so a document becomes chunks packed up to a token budget. The tokenizer
that decides is the embedding model's, passed in as `count_tokens`. Cuts fall where the text itself changes subject,
coarsest first: a Markdown heading always starts a new chunk (a title keeps the subheading right below it), and is
never a chunk alone (when the paragraph after it does not fit beside it, its first sentences do); paragraphs are
packed whole while they fit, and only a paragraph over the budget is cut into sentences (then words, then
characters). Consecutive chunks of one section share a few trailing sentences (`overlap_tokens`), so a fact on a cut
is whole in one of them.

Every chunk's text is the exact slice `text[start:end]` of the document, so an answer can cite the span it used.
The result depends on the text, the counter and the budgets only: the same input always gives the same chunks."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sagellm.common.errors import InvalidInput

TokenCounter = Callable[[str], int]
DEFAULT_MAX_TOKENS = 200  # all-MiniLM-L6-v2 takes 256, [CLS] and [SEP] included: room for a counter's estimate
DEFAULT_OVERLAP_TOKENS = 32

Span = tuple[int, int]  # [start, end) character offsets in the document

_HEADING = re.compile(r"#{1,6}(?:\s|$)")  # an ATX Markdown heading, once the line is stripped
_FENCES = ("```", "~~~")  # a code block's fence: a `#` inside it is a comment, not a heading
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n")  # the next sentence (or list item) starts where this ends
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: `text` is exactly `document[start:end]`; `ordinal` counts the document's chunks
    from 0 in reading order."""

    document_id: str
    ordinal: int
    text: str
    start: int
    end: int

    @property
    def span(self) -> Span:
        return (self.start, self.end)


def chunk_document(
    document_id: str,
    text: str,
    count_tokens: TokenCounter,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Chunk]:
    """The chunks of `text`, in order, each of at most `max_tokens` by `count_tokens`. A text of only whitespace has
    none (an index refuses such a document). Raises ValueError for budgets that make no sense, or when not even a
    single character fits in `max_tokens` (a counter that adds special tokens needs a budget above them)."""
    if max_tokens < 1:
        raise InvalidInput(f"max_tokens must be at least 1, not {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise InvalidInput(f"overlap_tokens must be in [0, max_tokens={max_tokens}), not {overlap_tokens}")
    packer = _Packer(text, count_tokens, max_tokens, overlap_tokens)
    spans = [span for section in _sections(text) for span in packer.pack(section)]
    return [Chunk(document_id, ordinal, text[start:end], start, end) for ordinal, (start, end) in enumerate(spans)]


class _Packer:
    """Packs one section's blocks into chunk spans within the budget, overlapping consecutive chunks."""

    def __init__(self, text: str, count_tokens: TokenCounter, max_tokens: int, overlap_tokens: int) -> None:
        self.text = text
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens

    def pack(self, section: list[tuple[Span, bool]]) -> list[Span]:
        """The chunk spans of one section's blocks (span, is a heading)."""
        blocks = [span for span, _ in section]
        headings = {span for span, is_heading in section if is_heading}
        units = deque(unit for block in blocks for unit in self._fitting(block, level=0))
        sentence_starts = sorted({start for block in blocks for start, _ in _sentences(self.text, block)})
        chunks: list[Span] = []
        start, end = units.popleft()
        only_headings = (start, end) in headings
        while units:
            unit = units.popleft()
            if self._tokens(start, unit[1]) <= self.max_tokens:
                end = unit[1]
                only_headings = only_headings and unit in headings
            elif only_headings and len(pieces := self._finer(unit)) > 1:
                units.extendleft(reversed(pieces))  # a heading alone says nothing: take what of the text fits
            else:
                chunks.append((start, end))
                start, end = self._overlap_start((start, end), unit, sentence_starts), unit[1]
                only_headings = False
        chunks.append((start, end))
        return chunks

    def _overlap_start(self, previous: Span, unit: Span, sentence_starts: list[int]) -> int:
        """Where the chunk that begins with `unit` starts: at the earliest sentence of the previous chunk from which
        that chunk's tail stays within `overlap_tokens` and the new chunk within `max_tokens`; else at `unit`."""
        best = unit[0]
        if self.overlap_tokens == 0:
            return best
        for start in reversed([s for s in sentence_starts if previous[0] < s < previous[1]]):
            if self._tokens(start, previous[1]) > self.overlap_tokens or self._tokens(start, unit[1]) > self.max_tokens:
                break
            best = start
        return best

    def _fitting(self, span: Span, level: int) -> list[Span]:
        """`span` whole if it fits the budget, else cut at the next finer level: sentences, words, characters."""
        if self._tokens(*span) <= self.max_tokens:
            return [span]
        if level == 2:
            return self._characters(span)
        pieces = _sentences(self.text, span) if level == 0 else _words(self.text, span)
        if pieces == [span]:  # nothing to cut at this level: go finer
            return self._fitting(span, level + 1)
        return [unit for piece in pieces for unit in self._fitting(piece, level + 1)]

    def _finer(self, unit: Span) -> list[Span]:
        """A unit cut at the coarsest level that cuts it: its sentences, else its words."""
        sentences = _sentences(self.text, unit)
        return sentences if len(sentences) > 1 else _words(self.text, unit)

    def _characters(self, span: Span) -> list[Span]:
        """A word over the budget (a long URL, a base64 blob) cut into the longest prefixes that fit."""
        pieces = []
        start, end = span
        while start < end:
            if self._tokens(start, start + 1) > self.max_tokens:
                raise InvalidInput(
                    f"max_tokens={self.max_tokens} is less than the tokens of the single character "
                    f"{self.text[start]!r}; raise it above what the counter adds to every text"
                )
            low, high = start + 1, end  # the longest prefix end that fits, by bisection
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if self._tokens(start, middle) <= self.max_tokens else (low, middle - 1)
            pieces.append((start, low))
            start = low
        return pieces

    def _tokens(self, start: int, end: int) -> int:
        return self.count_tokens(self.text[start:end])


def _sections(text: str) -> list[list[tuple[Span, bool]]]:
    """The text's blocks (paragraphs and heading lines) grouped into sections: a heading starts a new section,
    unless the current one has only headings so far (a title followed by a subheading stays with the text below)."""
    sections: list[list[tuple[Span, bool]]] = []
    only_headings = False
    for span, is_heading in _blocks(text):
        if not sections or (is_heading and not only_headings):
            sections.append([])
            only_headings = True
        sections[-1].append((span, is_heading))
        only_headings = only_headings and is_heading
    return sections


def _blocks(text: str) -> list[tuple[Span, bool]]:
    """Paragraphs (runs of non-blank lines) and heading lines, each as its span stripped of surrounding whitespace
    and whether it is a heading. A fenced code block is one paragraph, blank lines and `#` comments included."""
    blocks: list[tuple[Span, bool]] = []
    paragraph: Span | None = None
    in_fence = False
    for line in re.finditer(r"[^\n]*\n?", text):
        stripped = line.group().strip()
        if not line.group():
            break  # the empty match at the end of the text
        if stripped.startswith(_FENCES):
            in_fence = not in_fence
        is_heading = not in_fence and bool(_HEADING.match(stripped))
        if is_heading or (not stripped and not in_fence):
            if paragraph:
                blocks.append((paragraph, False))
                paragraph = None
            if is_heading:
                blocks.append((line.span(), True))
        else:
            paragraph = (paragraph[0] if paragraph else line.start(), line.end())
    if paragraph:
        blocks.append((paragraph, False))
    return [(_stripped(text, *span), is_heading) for span, is_heading in blocks]


def _sentences(text: str, span: Span) -> list[Span]:
    """The sentences (and lines) of a block, each stripped of surrounding whitespace."""
    pieces, start = [], span[0]
    for boundary in _SENTENCE_END.finditer(text, *span):
        pieces.append(_stripped(text, start, boundary.end()))
        start = boundary.end()
    pieces.append(_stripped(text, start, span[1]))
    return [(s, e) for s, e in pieces if s < e]


def _words(text: str, span: Span) -> list[Span]:
    return [match.span() for match in _WORD.finditer(text, *span)]


def _stripped(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end)
