"""The engine's intake (vLLM v1's input processor): `add_request`'s arguments made into a request's engine state.

It checks a request against the engine (its id unique, its prompt's tokens in the vocabulary and under the context,
its LoRA adapter served), tokenizes what came as text (the prompt, the bad words), compiles its grammar and starts its
detokenizer and thinking budget, then enters it in the engine's table of requests. So every reason a request is
refused is raised here, before it holds anything, and the engine's loop only sees requests that can run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.detokenizer import IncrementalDetokenizer
from sagellm.runtime.engine.grammar import GrammarCompiler, GuidedMatcher, grammar_compiler, restrictions_refusal
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.engine.lora_slots import LoraSlots
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.engine.penalties import BadWords, bad_word_token_ids
from sagellm.runtime.engine.prefix_hash import effective_salt
from sagellm.runtime.engine.prompt import request_token_problem
from sagellm.runtime.engine.request_state import RequestState
from sagellm.runtime.engine.sampler import make_generator
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.thinking import ThinkingTracker
from sagellm.runtime.models.lora_adapter import LoraAdapter
from sagellm.runtime.multimodal.media_feature import MediaFeature
from sagellm.runtime.multimodal.prompt_media import PromptMedia


class RequestIntake:
    def __init__(
        self,
        requests: dict[str, RequestState],
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: set[int],
        max_model_len: int,
        lora: LoraSlots | None,
        media: PromptMedia | None = None,
    ) -> None:
        """`requests`: the engine's table, by request id, that each new request enters; `media`: a model that sees
        images, how a prompt's images become its placeholders and features."""
        self._requests = requests
        self._media = media
        self._tokenizer, self._vocab, self._eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._max_model_len = max_model_len
        self._lora = lora
        self._grammars: GrammarCompiler | None = None  # made with the first guided request

    def new(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int,
        resumed_tokens: int = 0,
        scored: bool = False,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
        multi_modal_data: Mapping[str, Any] | None = None,
    ) -> RequestState:
        """The request's state, entered in the engine's table. `scored`: the prompt's logprobs, if asked for, were
        computed where it was prefilled; a resumed request's were too, on its first run. `multi_modal_data`
        (vLLM's): {"image": a PIL image or a list of them}, one per image placeholder of the prompt; or {"encoded":
        MediaFeatures with their embeddings}, an `encode` node's, the prompt given already expanded."""
        adapter = self._adapter(lora_request)
        cache_salt = self._salted(cache_salt, adapter)
        if request_id in self._requests:
            raise InvalidInput(f"request id {request_id!r} is already running")
        if isinstance(prompt, str):
            text, token_ids = prompt, self._tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, token_ids = None, list(prompt)
        # A resume's output so far ends the prompt: tokens as generated, never placeholders to expand (a model may
        # well have written its image token)
        cut = len(token_ids) - resumed_tokens
        expanded, features = self._with_media(token_ids[:cut], multi_modal_data)
        token_ids = expanded + token_ids[cut:]
        vocab = self._vocab
        problem = request_token_problem(token_ids, params, vocab)
        if problem is not None:
            raise InvalidInput(problem)
        budget = self._max_model_len - len(token_ids)
        if budget <= 0:
            raise InvalidInput(
                f"prompt has {len(token_ids)} tokens; this engine's context is {self._max_model_len} tokens"
            )
        matcher = self._matcher(params, token_ids[len(token_ids) - resumed_tokens :]) if params.guided else None
        seq = Sequence(request_id, token_ids, params, make_generator(params.seed), priority)
        seq.resumed_tokens, seq.cache_salt, seq.lora_adapter = resumed_tokens, cache_salt, adapter
        seq.mm_features = features
        if params.prompt_logprobs is not None and not (scored or resumed_tokens):
            seq.prompt_logprobs = [None]
        if params.bad_words:  # tokenized where the prompt was (off the event loop), else here
            sequences = params.bad_words_token_ids
            seq.bad_words = BadWords(
                sequences if sequences is not None else bad_word_token_ids(self._tokenizer, params.bad_words, vocab)
            )
        if matcher is not None and (refusal := restrictions_refusal(matcher, params, seq, self._eos_token_ids, vocab)):
            raise InvalidInput(refusal)
        detok = IncrementalDetokenizer.from_params(self._tokenizer, token_ids, params, resumed_tokens)
        metrics = RequestMetrics(arrival_time=seq.arrival_time, num_prompt_tokens=len(token_ids))
        logprobs = [] if params.logprobs is not None else None
        state = RequestState(seq, text, detok, metrics, logprobs, matcher=matcher)
        if params.thinking is not None:
            state.thinking = ThinkingTracker(params.thinking)
            for token in token_ids[len(token_ids) - resumed_tokens :]:  # a resume: where the output so far stands
                state.thinking.accept(token, self._tokenizer.decode([token]))
        self._requests[request_id] = state
        return state

    def _with_media(self, token_ids: list[int], data: Mapping[str, Any] | None) -> tuple[list[int], list[MediaFeature]]:
        """The prompt with its images' and clips' placeholders expanded, and their features; a model that takes media
        checks every prompt's placeholders pair up with items, so none reads a placeholder's own embedding."""
        if unknown := set(data or ()) - {"image", "audio", "encoded"}:
            raise InvalidInput(f'multi_modal_data: {", ".join(sorted(unknown))} not taken; it takes "image" and '
                               '"audio"')  # fmt: skip
        if self._media is None:
            if data:
                raise InvalidInput("this model takes no images or audio (multi_modal_data): serve one with a vision "
                                   "or audio encoder")  # fmt: skip
            return token_ids, []
        data = dict(data or {})
        if "encoded" in data:  # an `encode` node's: the prompt came expanded, its pictures encoded
            if any(v for m, v in data.items() if m != "encoded"):  # no model both sees and hears yet
                raise InvalidInput("a prompt an encode node expanded carries no media left to expand")
            features = list(data["encoded"])
            self._media.check_encoded(token_ids, features)
            return token_ids, features
        items = {m: v if isinstance(v, (list, tuple)) and not _one_clip(m, v) else [v] for m, v in data.items() if v}
        # every modality the model takes, so a placeholder without its item is refused
        return self._media.expand(token_ids, dict.fromkeys(self._media.modalities, ()) | items)

    def _adapter(self, request: LoRARequest | None) -> LoraAdapter | None:
        if request is None:
            return None
        if self._lora is None:
            raise InvalidInput(f"LoRA adapter {request.lora_name}: this engine serves none (start it with "
                               "enable_lora)")  # fmt: skip
        return self._lora.adapter(request)

    def _salted(self, cache_salt: str | None, adapter: LoraAdapter | None) -> str | None:
        """A request's cache salt with its adapter's digest: an adapter's KV of a prompt is not the base model's, nor
        another adapter's (one loaded anew under the same name or path included), so prefix blocks are shared only
        among requests of adapters of the same weights."""
        if adapter is None or self._lora is None:
            return effective_salt(cache_salt, None, None)
        return effective_salt(cache_salt, adapter.name, self._lora.digest(adapter))

    def _matcher(self, params: SamplingParams, generated: list[int]) -> GuidedMatcher:
        """A guided request's matcher, past the tokens already `generated` for it (by another engine, before a
        resume): its grammar compiled on first use in this process, then cached."""
        if self._grammars is None:
            self._grammars = grammar_compiler(self._tokenizer, self._vocab, self._eos_token_ids)
        matcher = self._grammars.matcher(params.guided)
        for token in generated:
            if not matcher.accept(token):
                raise InvalidInput(f"the tokens generated before the resume do not follow the {params.guided.kind}")
        return matcher


def _one_clip(modality: str, value: Any) -> bool:
    """vLLM takes one clip as (samples, sample_rate), and several as a list of those."""
    return modality == "audio" and isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int)
