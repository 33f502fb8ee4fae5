"""What a graph's front (admission, the sources, the gateway) reads of the model the graph serves, without its
weights: the tokenizer, the config, the sampling defaults, the context its engines serve and how many images a
prompt may carry.

The operators that need it (admission, the sources, the gateway's `http_source`, `rag_retrieve`) load it at `open`, from
the graph's `model` as written (a name is resolved, and an alias downloaded, on the host that runs the node), once per
process however many of them read it. The executor knows nothing of models: it hands operators the graph's attributes
and the limits its engine and encode nodes set."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sagellm.runtime.execution_graph.graph import Graph

GIVEN = "served_model"  # a graph attribute: a ServedModel a caller loaded already (tests, benchmarks, SAGE apps)


@dataclass(frozen=True)
class ServedModel:
    path: str
    tokenizer: Any
    config: Any
    sampling_defaults: dict[str, Any] | None = None
    max_model_len: int | None = None  # the context the graph's engines serve (`served_context`)
    max_images: int | None = None  # images a prompt may carry (`image_limit`; None: no cap)
    processor_files: Any = None  # ProcessorFiles: the checkpoint's preprocessing settings (a model with encoders)

    @functools.cached_property
    def prompt_media(self) -> Any:
        """The model's PromptMedia (its placeholders expanded as its engines expand them: what `/tokenize` and the
        Messages API's `count_tokens` count), built on first use; None for a model without encoders. Raises
        InvalidInput where the checkpoint lacks the preprocessing settings its encoders need."""
        if self.config is None or (self.config.vision is None and self.config.audio is None):
            return None
        from sagellm.common.errors import InvalidInput
        from sagellm.runtime.multimodal.prompt_media import PromptMedia

        if self.processor_files is None:
            raise InvalidInput(f"{self.path}: images and audio need the checkpoint's preprocessing settings")
        return PromptMedia.of_model(self.config, self.processor_files, self.tokenizer)

    @property
    def vocab_size(self) -> int | None:
        """Token ids are checked against it: the config's, else the tokenizer's."""
        if self.config is not None:
            return self.config.vocab_size
        return len(self.tokenizer) if self.tokenizer is not None else None


def context_limit(graph: Graph) -> int | None:
    """The smallest `max_model_len` any node of the graph sets, in any process (None: none sets one)."""
    lengths = [n.params["max_model_len"] for n in graph.nodes.values() if n.params.get("max_model_len") is not None]
    return min(lengths, default=None)


def image_limit(graph: Graph) -> int | None:
    """The fewest images per prompt any node of the graph allows (an engine's `limit_mm_per_prompt`, an encode
    node's `limit_images`; None: none caps them), so the gateway refuses more before it fetches any."""
    nodes = graph.nodes.values()
    engines = [(n.params.get("limit_mm_per_prompt") or {}).get("image") for n in nodes]
    encoders = [n.params.get("limit_images") for n in nodes]
    return min((limit for limit in (*engines, *encoders) if limit is not None), default=None)


def served_context(limit: int | None, model_config: Any) -> int | None:
    """The context the graph's engines serve: the smaller of the nodes' limit and the model's own; None when neither
    is known. Admission checks prompts against it and the gateway shows it."""
    own = getattr(model_config, "max_position_embeddings", None)
    return min([x for x in (limit, own) if x], default=None)


def served_model(attrs: Mapping[str, Any]) -> ServedModel | None:
    """The graph's model as its front reads it (`attrs`: the graph's attributes; `max_model_len` there is the nodes'
    limit); None for a graph without a model. One a caller handed in (`attrs[GIVEN]`) is taken as it is."""
    given = attrs.get(GIVEN)
    if given is not None:
        return given
    model = attrs.get("model")
    if not model:
        return None
    return _load(str(model), attrs.get("max_model_len"), attrs.get("max_images"), attrs.get("mmproj"),
                 bool(attrs.get("language_model_only")))  # fmt: skip


@functools.lru_cache(maxsize=8)
def _load(
    model: str, limit: int | None, max_images: int | None, mmproj: str | None = None, text_only: bool = False
) -> ServedModel:
    # Imported here: listing or validating operators must not load torch.
    from sagellm.runtime.engine.sampling_params import model_sampling_defaults
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.models.model_cache import resolve_model

    path = resolve_model(model)
    loaded = load_model(path, load_weights=False, mmproj=mmproj, language_model_only=text_only)
    context = served_context(limit, loaded.config)
    return ServedModel(str(path), loaded.tokenizer, loaded.config, model_sampling_defaults(loaded), context, max_images,
                       loaded.processor_files)  # fmt: skip
