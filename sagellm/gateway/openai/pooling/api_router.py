"""The pooling routes over the embedding nodes' models, as vLLM serves them (its request and response shapes):

- `/rerank`, `/v1/rerank` (Jina's shape) and `/v2/rerank` (Cohere's): the documents by relevance to the query;
- `/score` and `/v1/score`: text_1 against text_2, one text against many or pairwise;
- `/classify`: a classifier's labels and their probabilities for each text;
- `/pooling`: a model's raw output for each input (an embedding model's vector, a classifier's logits).

A relevance score is a cross-encoder's (a one-label sequence classifier: its logit through the activation its
sentence-transformers config names, a sigmoid by default, as CrossEncoder.predict gives it; a pair past the model's
length cut to it as CrossEncoder's tokenizer call cuts it, the longer text first, as Cohere's and Jina's APIs cut long
documents rather than refuse them), or, from an embedding
model, the cosine similarity of the two texts' vectors (vLLM's score for embedding models). Every text or pair is a
pipeline request of its own (`phase: embed`) on the path `/v1/embeddings` takes, so the embedding node batches them
with everyone else's."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.embedding.api_router import EmbeddingRoutes, embedding_inputs
from sagellm.gateway.openai.pooling.protocol import PoolingInputRequest, RerankRequest, ScoreRequest
from sagellm.runtime.engine.request_limits import MAX_EMBEDDING_INPUTS
from sagellm.runtime.pipeline.messages import Embedding


class PoolingRoutes:
    def __init__(self, embeddings: EmbeddingRoutes) -> None:
        self.embeddings = embeddings
        self.core = embeddings.core

    def register(self, app: App, guard: Guard | None) -> None:
        for path in ("/rerank", "/v1/rerank"):
            app.route("POST", path, self.rerank, guard)
        app.route("POST", "/v2/rerank", self.rerank_v2, guard)
        for path in ("/score", "/v1/score"):
            app.route("POST", path, self.score, guard)
        app.route("POST", "/classify", self.classify, guard)
        app.route("POST", "/pooling", self.pooling, guard)

    # -- the routes ---------------------------------------------------------------------------------------------
    async def rerank(self, http: HttpRequest) -> Response:
        """Jina's shape (vLLM's `/rerank` and `/v1/rerank`): each result with its document unless
        `return_documents` is false."""
        body = http.json(RerankRequest)
        model, ranked, tokens = await self._ranked(http, body)
        keep = body.return_documents is not False
        results = [
            {"index": i, **({"document": {"text": text}} if keep else {}), "relevance_score": score}
            for i, text, score in ranked
        ]
        return Response({"id": self.core.new_id("rerank"), "model": model, "usage": {"total_tokens": tokens},
                         "results": results})  # fmt: skip

    async def rerank_v2(self, http: HttpRequest) -> Response:
        """Cohere's v2 shape: indexes and scores, the billed units in `meta` (one search unit a query)."""
        body = http.json(RerankRequest)
        if body.return_documents:
            raise ApiError(400, "return_documents: Cohere's v2 rerank returns no documents", param="return_documents")
        _, ranked, tokens = await self._ranked(http, body)
        meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1, "input_tokens": tokens}}
        results = [{"index": i, "relevance_score": score} for i, _, score in ranked]
        return Response({"id": self.core.new_id("rerank"), "results": results, "meta": meta})

    async def score(self, http: HttpRequest) -> Response:
        body = http.json(ScoreRequest)
        model = self._model(body.model)
        firsts, seconds = _score_pairs(body.text_1, body.text_2)
        scores, tokens = await self._relevance(http, model, firsts, seconds, body.user)
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return Response(self._listed(model, data, tokens))

    async def classify(self, http: HttpRequest) -> Response:
        """Each text's most likely label, and every label's probability (a softmax of the logits, vLLM's)."""
        body = http.json(PoolingInputRequest)
        model = self._model(body.model)
        card = await self._card(model, "classify")
        if card.task != "classify":
            raise ApiError(400, f"model: {model} embeds texts; /classify needs a sequence classifier", param="model")
        texts = embedding_inputs(body.input)
        if not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input: /classify takes a text or a list of texts", param="input")
        results = await self.embeddings.vectors(model, texts, None, key_owner(http), body.user)
        data = []
        for i, result in enumerate(results):
            probs = _softmax(result.vector)
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": _label(card.labels, best), "probs": probs, "num_classes": len(probs)})
        return Response(self._listed(model, data, sum(r.prompt_tokens for r in results)))

    async def pooling(self, http: HttpRequest) -> Response:
        """The model's own output for each input, as the engine returns it: an embedding model's vector (normalized
        where the model normalizes), a classifier's logits."""
        body = http.json(PoolingInputRequest)
        model = self._model(body.model)
        results = await self.embeddings.vectors(model, embedding_inputs(body.input), None, key_owner(http), body.user)
        data = [{"index": i, "object": "pooling", "data": r.vector} for i, r in enumerate(results)]
        return Response(self._listed(model, data, sum(r.prompt_tokens for r in results)))

    # -- scoring --------------------------------------------------------------------------------------------------
    async def _ranked(self, http: HttpRequest, body: RerankRequest) -> tuple[str, list[tuple[int, str, float]], int]:
        """The model, (index, document, score) best first and cut to top_n, and the tokens it took."""
        model = self._model(body.model)
        documents = [_document_text(i, d) for i, d in enumerate(body.documents)]
        if not documents:
            raise ApiError(400, "documents: at least one document to rank", param="documents")
        if body.top_n is not None and body.top_n < 0:
            raise ApiError(400, f"top_n: a count of documents (0 for all), got {body.top_n}", param="top_n")
        firsts = [body.query] * len(documents)
        scores, tokens = await self._relevance(http, model, firsts, documents, body.user, body.max_tokens_per_doc)
        ranked = sorted(zip(range(len(documents)), documents, scores), key=lambda r: -r[2])
        return model, ranked[: body.top_n or None], tokens

    async def _relevance(
        self,
        http: HttpRequest,
        model: str,
        firsts: list[str],
        seconds: list[str],
        user: str | None,
        second_max_tokens: int | None = None,
    ) -> tuple[list[float], int]:
        """Each pair's relevance and the tokens counted: a cross-encoder's activated logit, or an embedding model's
        cosine similarity (each distinct text embedded once); `second_max_tokens`: each second text (a document)
        cut to its first that many tokens."""
        if len(firsts) > MAX_EMBEDDING_INPUTS:
            raise ApiError(400, f"at most {MAX_EMBEDDING_INPUTS} pairs a request, got {len(firsts)}")
        for text in [*firsts, *seconds]:
            if not text:
                raise ApiError(400, "an empty text has nothing to score; send at least one character")
        card = await self._card(model, "score")
        owner = key_owner(http)
        if card.task == "classify":
            if card.dim != 1:
                raise ApiError(400, f"model: {model} classifies into {card.dim} labels; scores need one (a reranker)",
                               param="model")  # fmt: skip
            pairs = list(zip(firsts, seconds))  # a pair past the model's length cut as CrossEncoder cuts it
            results = await self.embeddings.vectors(model, pairs, None, owner, user, True, second_max_tokens)
            return [_activated(r.vector[0], card.activation) for r in results], _tokens(results)
        if second_max_tokens is not None:
            raise ApiError.unsupported(
                "max_tokens_per_doc", "documents are cut for cross-encoders, not embedding models"
            )
        texts = list(dict.fromkeys([*firsts, *seconds]))
        results = await self.embeddings.vectors(model, texts, None, owner, user)
        vectors = dict(zip(texts, (_unit(r.vector) for r in results)))
        return [float(vectors[a] @ vectors[b]) for a, b in zip(firsts, seconds)], _tokens(results)

    def _model(self, name: str | None) -> str:
        return self.core.embedding_model(name)

    async def _card(self, model: str, what: str) -> Any:
        """The model's card (its task, labels, activation): a model served here or by an engine of ours (on demand:
        once loaded); one another server serves (its task unknown here) is not scored here."""
        card = await self.embeddings.ready_card(model)
        if card is None:
            raise ApiError(400, f"model: {model} is served by another server; {what} runs on the pooling models of "
                                "this gateway and its engines", param="model")  # fmt: skip
        return card

    def _listed(self, model: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        return {"id": self.core.new_id("pool"), "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


def _score_pairs(text_1: str | list[str], text_2: str | list[str]) -> tuple[list[str], list[str]]:
    """vLLM's pairing: one against one, one against each of many, or two lists of one length pairwise."""
    firsts = [text_1] if isinstance(text_1, str) else list(text_1)
    seconds = [text_2] if isinstance(text_2, str) else list(text_2)
    if not firsts or not seconds:
        raise ApiError(400, "text_1 and text_2: at least one text each", param="text_1" if not firsts else "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ApiError(400, f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: one text, or as many",
                       param="text_2")  # fmt: skip
    return firsts, seconds


def _document_text(index: int, document: Any) -> str:
    if isinstance(document, str):
        return document
    if isinstance(document, dict) and isinstance(document.get("text"), str) and set(document) == {"text"}:
        return document["text"]
    raise ApiError(400, f'documents[{index}]: a text or an object {{"text": ...}}', param=f"documents[{index}]")


def _activated(logit: float, activation: str) -> float:
    if activation == "sigmoid":
        return 1 / (1 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1 + math.exp(logit))
    return 1.0 if activation == "softmax" else logit  # a softmax over one label is 1, as CrossEncoder gives it


def _softmax(logits: list[float]) -> list[float]:
    values = np.exp(np.asarray(logits, dtype=np.float64) - max(logits))
    return (values / values.sum()).tolist()


def _unit(vector: list[float]) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(array)
    return array / norm if norm > 0 else array


def _label(labels: list[str] | tuple[str, ...], index: int) -> str:
    return labels[index] if index < len(labels) else f"LABEL_{index}"


def _tokens(results: list[Embedding]) -> int:
    return sum(r.prompt_tokens for r in results)
