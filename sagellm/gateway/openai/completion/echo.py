"""A completion's `echo`: its prompt before its output, as OpenAI's and vLLM's completions give it.

The text is the prompt's (its token ids decoded when it came as ids); with `logprobs` the prompt's tokens come first
in `logprobs` too, each scored given the ones before it, the first with null (nothing comes before it). This is what
lm-evaluation-harness's loglikelihood tasks read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagellm.gateway.openai.generation.reply_bodies import completion_logprobs
from sagellm.runtime.engine.outputs import TokenLogprob
from sagellm.runtime.pipeline.messages import Request


@dataclass(frozen=True)
class Echo:
    text: str
    token_ids: list[int]
    prompt_only: bool  # max_tokens 0: the prompt alone; the token generated after it is left out

    @classmethod
    def of(cls, request: Request, tokenizer: Any, prompt_only: bool) -> Echo:
        """`request` has its prompt's token ids (the gateway tokenized it)."""
        ids = list(request.prompt_token_ids or [])
        text = request.prompt if request.prompt is not None else tokenizer.decode(ids)
        return cls(text, ids, prompt_only)

    def text_with(self, output: str) -> str:
        return self.text if self.prompt_only else self.text + output

    def logprobs_with(
        self, tokenizer: Any, prompt: list[TokenLogprob | None] | None, output: list[TokenLogprob]
    ) -> dict[str, Any]:
        """Completions' `logprobs` of the prompt (`prompt`: its entries, None first) and then of the `output`."""
        shown = [] if self.prompt_only else output
        entries = [*(prompt or [None] * len(self.token_ids)), *shown]
        return completion_logprobs(tokenizer, entries, 0, [*self.token_ids, *(lp.token_id for lp in shown)])
