"""`EmbeddingEngine`: texts (or token ids, or text pairs) in, one vector per input out: an embedding model's
vectors for `POST /v1/embeddings`, a sequence classifier's logits (a cross-encoder's relevance, a classifier's
labels) for the rerank, score and classify routes.

A pooling request is a single forward pass with no KV cache and no decoding, so the engine is synchronous:
tokenize everything, check every input before any compute (one bad input fails the request, as OpenAI does), sort
by length and cut into batches so each pads only to its own longest input, run the encoder, pool, normalize (a
classifier: its head's logits, as they are). A pair (query, document) is tokenized as one input,
`[CLS] query [SEP] document [SEP]` with its segment ids, as a cross-encoder was trained (a decoder reranker's as its
chat template renders a query and a document: causal_scorer.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sagellm.common.errors import InvalidInput
from sagellm.runtime.embedding.causal_scorer import causal_scores
from sagellm.runtime.embedding.encoder import load_encoder
from sagellm.runtime.embedding.pooling import pool

DEFAULT_MAX_BATCH_TOKENS = 8192


class EmbeddingInputError(InvalidInput):
    """An input the model cannot embed (empty, or bad token ids): the request is invalid (HTTP 400)."""

    def __init__(self, message: str, index: int | None) -> None:
        super().__init__(message)
        self.index = index  # position of the offending input; None when the request as a whole is wrong


class InputTooLongError(EmbeddingInputError):
    """An input has more tokens than the model accepts (OpenAI's `context_length_exceeded`)."""

    code = "context_length_exceeded"

    def __init__(self, index: int, num_tokens: int, limit: int) -> None:
        super().__init__(
            f"input {index} has {num_tokens} tokens, more than this model's limit of {limit}; shorten or split it",
            index,
        )
        self.num_tokens = num_tokens
        self.limit = limit


Input = str | Sequence[int] | tuple[str, str]  # a text, token ids, or a pair of texts (a classifier's)


@dataclass
class EmbeddingResult:
    embeddings: torch.Tensor  # [N, dim] float32, in input order (a classifier's: its logits)
    prompt_tokens: list[int]  # tokens per input, special tokens ([CLS], [SEP]) included

    @property
    def total_tokens(self) -> int:
        return sum(self.prompt_tokens)


class EmbeddingEngine:
    """One embedding model in this process. `model` is an encoder directory (sentence-transformers or Hugging Face);
    `name` is what clients call it (default: the directory's name). `max_batch_tokens` bounds a batch's padded size
    (inputs x longest input); `num_threads` sets torch's intra-op threads for the whole process.

    Not re-entrant: call `embed` from one thread at a time."""

    def __init__(
        self,
        model: str | Path,
        *,
        name: str | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        num_threads: int | None = None,
    ) -> None:
        if max_batch_tokens < 1:
            raise InvalidInput(f"max_batch_tokens must be at least 1, not {max_batch_tokens}")
        if num_threads:
            torch.set_num_threads(num_threads)
        path = Path(model).expanduser()
        self.name = name or path.name
        self._encoder = load_encoder(path)
        self.tokenizer = self._encoder.tokenizer
        self.card = self._encoder.card
        self.dim, self.max_length = self.card.dim, self.card.max_length
        self.normalized = self._encoder.spec.normalize  # unit-length vectors: cosine similarity is a dot product
        self.task, self.labels, self.activation = self.card.task, self.card.labels, self.card.activation
        self.max_batch_tokens = max_batch_tokens
        # Padding is masked out, but RoBERTa-style models number positions from the pad id, so use the real one.
        self._pad_id = self.tokenizer.pad_token_id or 0

    def embed(
        self, inputs: Sequence[Input], truncate: bool = False, second_max_tokens: Sequence[int | None] = ()
    ) -> EmbeddingResult:
        """One vector per input, in order. A text is tokenized with the model's special tokens; token ids are the
        model's input as given (what `tokenizer(text).input_ids` returns, special tokens included); a pair of texts
        (a classifier's only) as the model's tokenizer joins two segments. `truncate`: an input over `max_length`
        tokens is cut to it as the tokenizer cuts (its end, the longer segment of a pair first; token ids: their
        last ones dropped) rather than refused. `second_max_tokens[i]`: the pair `inputs[i]`'s second text cut to
        its first that many tokens first (Cohere's `max_tokens_per_doc`; None: as it is).

        Raises EmbeddingInputError (a ValueError) for no inputs, an empty input, an out-of-range token id or a pair
        sent to an embedding model, and its subclass InputTooLongError for an input over `max_length` tokens
        (unless `truncate`); nothing is computed then."""
        if any(second_max_tokens):
            inputs = [
                (item[0], _first_tokens(self.tokenizer, item[1], cap)) if cap and isinstance(item, tuple) else item
                for item, cap in zip(inputs, second_max_tokens)
            ]
        encoded = self._encoded(inputs, truncate)
        embeddings = torch.empty(len(encoded), self.dim, dtype=torch.float32)  # [N, D]
        for batch in _length_batches([len(ids) for ids, _ in encoded], self.max_batch_tokens):
            embeddings[batch] = self._forward([encoded[i] for i in batch])  # [B, D]
        return EmbeddingResult(embeddings, [len(ids) for ids, _ in encoded])

    def _encoded(self, inputs: Sequence[Input], truncate: bool) -> list[tuple[list[int], list[int] | None]]:
        """Each input's token ids and, for a pair, its segment ids."""
        if isinstance(inputs, str):
            raise TypeError("embed() takes a list of inputs; wrap a single text as [text]")
        if not inputs:
            raise EmbeddingInputError("no inputs; send at least one text or token-id list", None)
        pairs = {i: item for i, item in enumerate(inputs) if isinstance(item, tuple)}
        if pairs and self.task != "classify":
            raise EmbeddingInputError(f"{self.name} embeds texts; pairs of texts are scored by a cross-encoder", None)
        texts = {i: item for i, item in enumerate(inputs) if isinstance(item, str)}
        for i, text in [*texts.items(), *((i, t) for i, pair in pairs.items() for t in pair)]:
            if not isinstance(text, str) or not text:
                raise EmbeddingInputError(f"input {i} is an empty string; {self.task} needs at least one character", i)
        if self._encoder.spec.lowercase:
            texts = {i: text.lower() for i, text in texts.items()}
            pairs = {i: (a.lower(), b.lower()) for i, (a, b) in pairs.items()}
        encoded: dict[int, tuple[list[int], list[int] | None]] = {}
        cut = {"truncation": True, "max_length": self.max_length} if truncate else {}
        if texts:
            tokenized = self.tokenizer(list(texts.values()), verbose=False, **cut)["input_ids"]
            encoded |= {i: (ids, None) for i, ids in zip(texts, tokenized)}
        causal = self._encoder.causal
        if pairs and causal is not None and causal.templated:
            rendered = {i: causal.render(self.tokenizer, a, b) for i, (a, b) in pairs.items()}
            encoded |= {i: (causal.cut(ids, self.max_length) if truncate else ids, None) for i, ids in rendered.items()}
        elif pairs:
            firsts, seconds = [a for a, _ in pairs.values()], [b for _, b in pairs.values()]
            tokenized = self.tokenizer(firsts, seconds, verbose=False, **cut)
            types = tokenized.get("token_type_ids") or [None] * len(pairs)
            encoded |= {i: (ids, t) for i, ids, t in zip(pairs, tokenized["input_ids"], types)}
        items = [
            encoded[i] if i in encoded else (self._checked_ids(i, item)[: self.max_length if truncate else None], None)
            for i, item in enumerate(inputs)
        ]
        for i, (ids, _) in enumerate(items):
            if len(ids) > self.max_length:
                raise InputTooLongError(i, len(ids), self.max_length)
        return items

    def _checked_ids(self, index: int, ids: Sequence[int]) -> list[int]:
        vocab = self._encoder.vocab_size
        if not ids:
            raise EmbeddingInputError(f"input {index} is an empty token list; embeddings need a token", index)
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise EmbeddingInputError(f"input {index} has token ids outside the vocabulary [0, {vocab})", index)
        return list(ids)

    @torch.inference_mode()
    def _forward(self, batch: list[tuple[list[int], list[int] | None]]) -> torch.Tensor:
        """The vectors (or logits) of a batch of token-id lists, longest first: right-padded to the first one's
        length, a pair's segment ids beside its tokens (a decoder reranker's: its scores, padded on the left)."""
        if self._encoder.causal is not None:
            return causal_scores(self._encoder.model, [ids for ids, _ in batch], self._pad_id, self._encoder.causal)
        input_ids = torch.full((len(batch), len(batch[0][0])), self._pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros_like(input_ids)  # [B, T]
        segments = torch.zeros_like(input_ids)  # [B, T]
        for row, (ids, types) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            if types is not None:
                segments[row, : len(types)] = torch.tensor(types)
        given = {"input_ids": input_ids, "attention_mask": mask}
        if any(types is not None for _, types in batch):
            given["token_type_ids"] = segments
        if self.task == "classify":
            return self._encoder.model(**given).logits.float()  # [B, labels]
        hidden = self._encoder.model(**given).last_hidden_state  # [B, T, H]
        vectors = pool(hidden, mask, self._encoder.spec.pooling)  # [B, D]
        return F.normalize(vectors, p=2, dim=-1) if self.normalized else vectors  # [B, D]


def _first_tokens(tokenizer: Any, text: str, count: int) -> str:
    """`text` up to the end of its `count`-th token (without special tokens), as the tokenizer splits it alone."""
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(spans) <= count else text[: spans[count - 1][1]]


def _length_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Input indexes grouped longest first, so each batch pads only to its own longest input; a batch's padded size
    (inputs x its longest) stays within `max_batch_tokens`, except that a batch always holds at least one input."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
