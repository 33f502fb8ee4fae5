"""What is done to a completion's or a chat's requests before they enter the graph, off the event loop every stream
shares: the model they name checked to be one that writes text, long prompts tokenized, and a constraint compiled
for the graph's model, so a schema that cannot be used is a 400 naming its field now rather than an error after a
wait in the queue."""

from __future__ import annotations

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.generation.structured import check_compiles
from sagellm.gateway.serving.interface import ServingApi
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.pipeline.messages import Request


def generation_model(core: ServingApi, name: str | None) -> str | None:
    """The `Request.model` of a completion or chat that names the model `name` (`ServingApi.instance_model`). A 400
    naming `model` for an embedding model, which writes no text (its node would fail the request): the client is
    told where it belongs and which models write text (Open WebUI's model picker offers every model listed)."""
    embedding = core.embedding_models()
    if name is not None and name in embedding:
        writers = ", ".join(repr(model) for model in core.models() if model not in embedding) or "none"
        message = (
            f"model: {name!r} is an embedding model, which writes no text: send it to /v1/embeddings "
            f"(the models here that write text: {writers})"
        )
        raise ApiError(400, message, param="model")
    return core.instance_model(name)


async def prepare(
    core: ServingApi,
    requests: list[Request],
    constraint: tuple[GuidedDecoding, str] | None,
    every_prompt: bool = False,
) -> None:
    """`requests` ready to submit: long prompts tokenized (`every_prompt`: all, for a reply that shows their tokens),
    and `constraint` (with the field it came in) compiled for the graph's model (a 400 naming its field when it
    cannot be)."""
    await core.tokenize_prompts(requests, every=every_prompt)
    if constraint is not None and requests[0].model is None:
        await check_compiles(core.served, *constraint)
