"""The offline API: `LLM(model).generate(prompts, params)`, `.chat(messages)` and `.stream(prompt)`.

A thin loop around `LLMEngine`: add every request, step until all finish. Batching, chunked prefill and prefix
reuse happen inside the engine, so a list of prompts runs as one continuous batch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from sagellm.common.errors import InvalidInput
from sagellm.common.logging import default_logging
from sagellm.runtime.engine.config import ENGINE_FIELDS, EngineConfig
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.engine.outputs import RequestOutput
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.parallel.engine import start_engine

# Text, token ids, or (vLLM's) {"prompt": text or "prompt_token_ids": ids, "multi_modal_data": {"image": images}}
Prompt = str | list[int] | dict[str, Any]
Message = dict[str, str]


class LLM:
    """An engine on one model. `model` is a path (HF directory or .gguf file) or a cache alias such as
    "smollm2-135m-instruct" (downloaded on first use). Keyword arguments are `EngineConfig` fields."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

        default_logging()
        unknown = set(engine_args) - set(ENGINE_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s) {sorted(unknown)}; have {sorted(set(ENGINE_FIELDS) - {'model'})}"
            )
        path = resolve_model(model or DEFAULT_MODEL)
        self.engine = start_engine(EngineConfig(model=str(path), **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order. A prompt is text or token ids. With
        `n` > 1, a prompt's output holds its n choices (`outputs[i].index == i`), its prompt prefilled once.
        `lora_request` (vLLM's): the LoRA adapter every prompt is generated with, or one per prompt (None: the base
        model), on an engine made with `enable_lora=True`; prompts of different adapters share steps. A prompt
        with images is a dict, as vLLM's: {"prompt": text (or "prompt_token_ids": ids), "multi_modal_data":
        {"image": a PIL image or a list}}, each image at a placeholder of the prompt (LLaVA's "<image>")."""
        batch = _as_batch(prompts)
        all_params = _per_prompt(params or self.default_sampling_params(), len(batch))
        adapters = _adapters(lora_request, len(batch))
        choices = [self._add(prompt, p, lora) for prompt, p, lora in zip(batch, all_params, adapters)]
        finished: dict[str, RequestOutput] = {}
        total = sum(len(ids) for ids in choices)
        with tqdm(total=total, desc="generate", disable=not use_tqdm, unit="seq") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [_joined([finished[rid] for rid in ids]) for ids in choices]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in conversations]
        return self.generate(prompts, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields an output per new token of one request (`outputs[0].text_delta` is the new text)."""
        params = params or self.default_sampling_params()
        if params.n != 1:
            raise InvalidInput(f"stream follows one choice: n={params.n} is for generate()")
        (request_id,) = self._add(prompt, params)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def default_sampling_params(self) -> SamplingParams:
        """What a call without `params` uses: the model's own sampling defaults (its generation config), else
        SamplingParams' (temperature 1, no `max_tokens` bound but the context), as vLLM's `LLM` does."""
        return SamplingParams.with_defaults(self.engine.sampling_defaults)

    def apply_chat_template(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidInput(f"model {self.engine.model.name!r} has no chat template; use generate() with text")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in newer transformers

    def _add(self, prompt: Prompt, params: SamplingParams, lora: LoRARequest | None = None) -> list[str]:
        """The engine's request ids of the prompt's choices."""
        prompt, media = _prompt_and_media(prompt)
        if params.n == 1:
            request_ids = [str(next(self._ids))]
            self.engine.add_request(request_ids[0], prompt, params, lora_request=lora, multi_modal_data=media)
            return request_ids
        group = str(next(self._ids))
        request_ids = [f"{group}-{i}" for i in range(params.n)]
        for i, request_id in enumerate(request_ids):
            self.engine.add_request(request_id, prompt, params.choice(i), group=group, lora_request=lora,
                                    multi_modal_data=media)  # fmt: skip
        return request_ids


def _prompt_and_media(prompt: Prompt) -> tuple[str | list[int], dict[str, Any] | None]:
    """A prompt's text or ids, and its media (vLLM's dict form)."""
    if not isinstance(prompt, dict):
        return prompt, None
    if unknown := set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}:
        raise InvalidInput(f"a prompt's dict takes prompt or prompt_token_ids, and multi_modal_data: not "
                           f"{', '.join(sorted(unknown))}")  # fmt: skip
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise InvalidInput("a prompt's dict has one of prompt (text) and prompt_token_ids")
    text_or_ids = prompt["prompt"] if "prompt" in prompt else list(prompt["prompt_token_ids"])
    return text_or_ids, prompt.get("multi_modal_data")


def _joined(outputs: list[RequestOutput]) -> RequestOutput:
    """One prompt's output from its choices' (the first's id, prompt logprobs and metrics)."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    for index, out in enumerate(outputs):
        out.outputs[0].index = index
    first.outputs = [out.outputs[0] for out in outputs]
    return first


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    return prompts


def _adapters(lora: LoRARequest | Sequence[LoRARequest | None] | None, n: int) -> list[LoRARequest | None]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * n
    if len(lora) != n:
        raise InvalidInput(f"got {len(lora)} LoRA requests for {n} prompts")
    return list(lora)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidInput(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)
