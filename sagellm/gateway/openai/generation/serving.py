"""What is done to a completion's or a chat's requests before they enter the graph, off the event loop every stream
shares: long prompts tokenized, and a constraint compiled for the graph's model, so a schema that cannot be used is a
400 naming its field now rather than an error after a wait in the queue."""

from __future__ import annotations

from sagellm.gateway.openai.generation.structured import check_compiles
from sagellm.gateway.serving.interface import ServingApi
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.pipeline.messages import Request


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
