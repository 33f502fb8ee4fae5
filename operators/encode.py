"""The `encode` operator: a model's vision encoder as a stage of the graph before prefill (vLLM's and SGLang's "E" of
EPD), in its own process or beside the engines.

Each request with images is expanded and encoded here: its images preprocessed as the model's processor does, its
prompt's placeholders expanded (runtime/multimodal/prompt_media.py), every picture of the requests a step took run
through the encoder in one pass but those it encoded before (kept by hash, as an engine's encoder cache keeps them),
and the request sent on with its expanded prompt and its pictures' embeddings (`Request.encoded_images`, frames on
the wire) in place of the image files. The prefill or colocated engine then puts those embeddings in place of the
placeholders' token embeddings without an encoder pass of its own, and a decode worker keys the prompt's blocks by the
same hashes. A request without images passes through untouched; one whose images cannot be read, or do not pair up
with its placeholders, fails alone with a 400's error. Audio clips pass through too, to the engine that prefills
their prompt, which encodes them itself (this node runs images only)."""

from __future__ import annotations

from typing import Any, ClassVar

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.pipeline.messages import EncodedImage, Request, RequestError
from sagellm.runtime.pipeline.operator import OperatorContext, StepOperator, register_operator


@register_operator
class EncodeOperator(StepOperator):
    name = "encode"
    accepts = (Request,)
    threads_param = "num_threads"
    parameter_help: ClassVar[dict[str, str]] = {
        "model": "the model whose vision encoder runs here (default: the graph's)",
        "backend": "the backend the encoder runs on (cpu, cuda, ...)",
        "max_batch": "requests whose images one step encodes together",
        "num_threads": "torch threads the encoder computes with (default: torch's)",
        "limit_images": "the most images one prompt may carry (vLLM's --limit-mm-per-prompt; default: no cap)",
    }

    def __init__(
        self,
        model: str | None = None,
        backend: str = "cpu",
        max_batch: int = 8,
        num_threads: int | None = None,
        limit_images: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise FieldError("max_batch", f"max_batch must be >= 1, got {max_batch}")
        if limit_images is not None and limit_images < 0:
            raise FieldError("limit_images", f"limit_images must be >= 0, got {limit_images}")
        self.model, self.backend, self.max_batch = model, backend, max_batch
        self.num_threads, self.limit_images = num_threads, limit_images
        self._queue: list[Request] = []
        self.encoder: Any = None
        self.prompts: Any = None
        self.tokenizer: Any = None

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        # Imported here: listing or validating operators must not load torch.
        import torch

        from sagellm.backends import get_backend
        from sagellm.runtime.models.loader import load_model
        from sagellm.runtime.models.model_cache import resolve_model
        from sagellm.runtime.multimodal.encoder_cache import EncoderCache
        from sagellm.runtime.multimodal.encoder_runner import EncoderRunner
        from sagellm.runtime.multimodal.engine_media import cached_rows
        from sagellm.runtime.multimodal.prompt_media import PromptMedia

        model = self.model or ctx.graph_attrs.get("model")
        if not model:
            raise InvalidInput(f"node {ctx.node_id!r}: no model (set the graph's `model` or the node's `model`)")
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        mmproj = ctx.graph_attrs.get("mmproj")  # a GGUF model's vision encoder, in its own file
        text_only = bool(ctx.graph_attrs.get("language_model_only"))  # refused: this node is the encoder
        loaded = load_model(resolve_model(str(model)), encoders_only=True, mmproj=mmproj, language_model_only=text_only)
        vision = loaded.config.vision  # a model that hears but does not see: everything passes
        self.encoder = None
        if vision is not None:  # an image sent again is not encoded again (as an engine's own encoder cache)
            runner = EncoderRunner(loaded.config, loaded.weights, get_backend(self.backend))
            self.encoder = EncoderCache({"image": runner}, cached_rows(loaded.config))
        self.tokenizer = loaded.tokenizer
        limits = {"image": self.limit_images} if self.limit_images is not None else None
        self.prompts = PromptMedia.of_model(loaded.config, loaded.processor_files, loaded.tokenizer, limits)

    def close(self) -> None:
        self.encoder = self.prompts = self.tokenizer = None

    # -- the Step contract ----------------------------------------------------------------------------------------
    def add(self, item: Request) -> list[Any]:
        if not item.images or self.encoder is None:
            return [item]
        self._queue.append(item)
        return []

    def step(self) -> list[Any]:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        from sagellm.runtime.multimodal.prompt_media import decoded_images

        out: list[Any] = []
        expanded: list[tuple[Request, list[int], list[Any]]] = []
        for request in batch:
            try:
                ids = request.prompt_token_ids
                if ids is None:
                    ids = self.tokenizer.encode(request.prompt or "", add_special_tokens=True)
                cut = len(ids) - request.resumed_tokens  # a resume's output so far: tokens, not placeholders
                prompt, features = self.prompts.expand(ids[:cut], {"image": decoded_images(request.images)})
                expanded.append((request, prompt + list(ids[cut:]), features))
            except (InvalidInput, OSError, ValueError) as error:  # (PIL's UnidentifiedImageError is an OSError)
                out.append(RequestError(request_id=request.request_id, code="invalid_request", message=str(error)))
        embeds = iter(self.encoder.embeddings_of([f for _, _, features in expanded for f in features]))
        for request, ids, features in expanded:
            request.prompt_token_ids, request.images = ids, None
            request.encoded_images = [
                EncodedImage(hash=f.hash, offset=f.offset, length=f.length, embeds=next(embeds), grid=f.grid)
                for f in features
            ]
            out.append(request)
        return out

    def has_work(self) -> bool:
        return bool(self._queue)

    def capacity(self) -> int:
        return max(0, 4 * self.max_batch - len(self._queue))

    def in_flight(self) -> list[str]:
        return [r.request_id for r in self._queue]

    def abort(self, request_ids: list[str]) -> None:
        gone = set(request_ids)
        self._queue = [r for r in self._queue if r.request_id not in gone]
