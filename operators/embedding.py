"""The `embedding` operator: an embedding model as an engine node, one instance of its model for route.

Each embed request (`Request.phase == "embed"`) holds one input, its text (`prompt`) or token ids; the node takes up
to `max_batch` of them between steps and embeds them in one pass of `EmbeddingEngine` (which sorts by length and pads
each batch to its own longest), so concurrent requests share the model's passes as decode steps do. An input the
model cannot take fails that request alone: the batch is embedded again without it. The result is an `Embedding`
item: the vector and the input's token count."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from sagellm.common.errors import FieldError
from sagellm.runtime.embedding.card import PoolingCard
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext, StepOperator, register_operator


@register_operator
class EmbeddingOperator(StepOperator):
    name = "embedding"
    accepts = (Request,)
    parameter_help: ClassVar[dict[str, str]] = {
        "model": "the embedding model: a path or a cache name",
        "served_model_name": "the model name requests ask for (default: the cache name, or a path's directory name)",
        "max_batch": "requests embedded in one step",
    }

    def __init__(self, model: str, served_model_name: str | None = None, max_batch: int = 64) -> None:
        if max_batch < 1:
            raise FieldError("max_batch", f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.served_model_name = served_model_name or served_name(model)
        self.engine: Any = None
        self._queue: list[Request] = []

    @classmethod
    def instance_stats(cls, node_id: str, params: dict[str, Any]) -> InstanceStats:
        return cls(**params)._new_stats(node_id)

    def _new_stats(self, node_id: str) -> InstanceStats:
        return InstanceStats(node_id, role="embedding", model=self.served_model_name, max_running=self.max_batch)

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        # Here: listing operators must not load torch. A name is resolved (an alias downloaded) on this host.
        from sagellm.runtime.embedding import EmbeddingEngine
        from sagellm.runtime.models.model_cache import resolve_model

        self.engine = EmbeddingEngine(resolve_model(self.model), name=self.served_model_name)
        self.stats = ctx.instances.setdefault(ctx.node_id, self._new_stats(ctx.node_id))

    def close(self) -> None:
        self.engine = None

    # -- the Step contract ----------------------------------------------------------------------------------------
    def add(self, item: Request) -> list[Any]:
        if item.phase != "embed":
            message = f"{self.ctx.node_id} embeds; it was sent a {item.phase} request"
            return [RequestError(request_id=item.request_id, code="internal", message=message)]
        self._queue.append(item)
        self.stats.running = len(self._queue)
        return []

    def step(self) -> list[Any]:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        started = time.time()
        out = self._embed(batch, started)
        self.stats.running = len(self._queue)
        return out

    def has_work(self) -> bool:
        return bool(self._queue)

    def capacity(self) -> int:
        return max(0, self.max_batch - len(self._queue))

    def in_flight(self) -> list[str]:
        return [r.request_id for r in self._queue]

    def abort(self, request_ids: list[str]) -> None:
        gone = set(request_ids)
        self._queue = [r for r in self._queue if r.request_id not in gone]
        self.stats.running = len(self._queue)

    # -- embedding ------------------------------------------------------------------------------------------------
    def _embed(self, batch: list[Request], started: float) -> list[Any]:
        """The batch's items; an input the model refuses fails alone, the others are embedded without it. Texts,
        token ids and pairs of texts (a cross-encoder's) go in one pass each, those cut to the model's length in
        another."""
        out: list[Any] = []
        for truncate in (False, True):
            cut = [r for r in batch if r.truncate == truncate]
            texts = [r for r in cut if r.prompt_token_ids is None and r.pair is None]
            ids = [r for r in cut if r.prompt_token_ids is not None]
            pairs = [r for r in cut if r.prompt_token_ids is None and r.pair is not None]
            for group, inputs in (
                (texts, [r.prompt or "" for r in texts]),
                (ids, [r.prompt_token_ids for r in ids]),
                (pairs, [(r.prompt or "", r.pair) for r in pairs]),
            ):
                if group:
                    out += self._embed_group(group, inputs, started, truncate)
        return out

    def _embed_group(self, group: list[Request], inputs: list[Any], started: float, truncate: bool) -> list[Any]:
        from sagellm.runtime.embedding import EmbeddingInputError

        try:
            result = self.engine.embed(inputs, truncate, [r.pair_max_tokens for r in group])
        except EmbeddingInputError as error:
            index = error.index if error.index is not None else 0
            code = error.code  # invalid_request, or context_length_exceeded for an input over the model's limit
            refused = RequestError(request_id=group[index].request_id, code=code, message=_of_one_input(str(error)))
            rest = [i for i in range(len(group)) if i != index]
            return (
                [refused, *self._embed_group([group[i] for i in rest], [inputs[i] for i in rest], started, truncate)]
                if rest
                else [refused]
            )
        now = time.time()
        out: list[Any] = []
        for request, vector, tokens in zip(group, result.embeddings.tolist(), result.prompt_tokens):
            metrics = RequestMetrics(
                arrival_time=request.arrival_time, first_scheduled_time=request.dispatched_time or started,
                first_token_time=now, finished_time=now, num_prompt_tokens=tokens,
            )  # fmt: skip
            out.append(Embedding(request_id=request.request_id, vector=vector, prompt_tokens=tokens, time=now,
                                 metrics=metrics))  # fmt: skip
        return out

    @property
    def card(self) -> PoolingCard:
        return self.engine.card

    @property
    def dim(self) -> int:
        return self.engine.dim

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def task(self) -> str:
        """ "embed" (its vectors) or "classify" (a sequence classifier's logits: a reranker's, a classifier's)."""
        return self.engine.task

    @property
    def labels(self) -> tuple[str, ...]:
        return self.engine.labels

    @property
    def activation(self) -> str:
        return self.engine.activation


def served_name(model: str) -> str:
    """What clients call a model by default: a path by its directory's name, a cache name or org/name as given."""
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def _of_one_input(message: str) -> str:
    """The engine's words about "input N" of its batch without that number, which means nothing to the request's
    one input (the gateway puts the input's number in the client's batch in front)."""
    return message.split(" ", 2)[2] if message.startswith("input ") else message
