"""The `pd_split` operator: decides per request whether prefill and decode run on separate workers (PD
disaggregation) or together on one engine, by how much prefill work the request really brings.

Splitting pays when the prompt's uncached part is long: the prefill then runs on a prefill worker without stalling
the decode batch, at the price of moving the prompt's KV. Below `threshold_tokens` uncached prompt tokens it does not
pay, so the request stays colocated, unless `ratio` is set and the uncached prompt is more than `ratio` times the
output the request expects (a prompt-heavy request: the seeds' "adaptive" PD policy). The measure is tokens
(admission fills `prompt_token_ids`), never characters, except for the model of attached servers whose tokenizer the
gateway lacks: estimated there as the control-plane API does, four characters a token (`estimated_tokens`). Such a
request's PD pair is two servers, a prefill and a decode one, which route picks and `remote_engine` links (vLLM's
`kv_transfer_params`).

What is cached: pd_split sees only its own decisions, not which instance route later picks, so it keeps one
`PrefixIndex` for the whole pool of decode-capable instances and records every prompt it passes on (colocated ones
are cached by the engine that runs them; PD ones land, as transferred KV, on a decode worker's cache). A prefix counts
as cached if any of them was sent before: optimistic when route spreads equal prefixes over instances, which the
cache_aware and locality strategies avoid. Prompts are hashed under their salt and LoRA adapter (`route.prefix_salt`),
as the engine and route hash them: a prompt cached for another tenant or adapter is not cached for this one.

Even a long prompt stays colocated when the PD path cannot take it, each reason counted in `decisions`:
"no_prompt_tokens" (not tokenized, so unmeasurable), "no_prefill_instance", "prefill_unhealthy", "prefill_failed"
(a retry, and each healthy prefill instance failed it before),
"no_decode_instance", "decode_unhealthy", "kv_transfer_failing" (every healthy decode worker has had
`max_transfer_failures` failed transfers in a row), "decode_saturated" (every usable decode worker is full).
The other counts are "short_prompt" (colocated by the threshold), "remote_pd" (the prefill or the decode half of a
PD pair another gateway runs across servers) and "pd" (sent to prefill)."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from sagellm.common.errors import FieldError
from sagellm.operators.kv_event_index import EventIndex
from sagellm.operators.prefix_index import PrefixIndex
from sagellm.operators.route import prefix_salt
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats, MapOperator, register_operator

POOL = "decode_capable"  # the index's key (with the model's name): the pool of instances a prompt may be cached on


@register_operator
class PDSplit(MapOperator):
    name = "pd_split"
    accepts = (Request,)
    parameter_help: ClassVar[dict[str, str]] = {
        "threshold_tokens": "uncached prompt tokens from which a request takes the prefill/decode path",
        "block_size": "tokens per block of its prefix index (the engines' block_size)",
        "max_transfer_failures": "failed KV transfers in a row into a decode worker before it is avoided",
        "ratio": "also split a shorter prompt over this many times the expected output (0: off)",
        "kv_events": "read what each engine holds from its KV events where it publishes them (else estimate)",
    }

    def __init__(
        self,
        threshold_tokens: int = 512,
        block_size: int = 16,
        max_transfer_failures: int = 3,
        ratio: float = 0.0,
        kv_events: bool = True,
    ) -> None:
        if threshold_tokens < 0:
            raise FieldError("threshold_tokens", f"threshold_tokens must be >= 0, got {threshold_tokens}")
        if ratio < 0:
            raise FieldError("ratio", f"ratio must be >= 0 (0: off), got {ratio}")
        self.ratio = ratio
        if max_transfer_failures < 1:
            raise FieldError(
                "max_transfer_failures", f"max_transfer_failures must be >= 1, got {max_transfer_failures}"
            )
        self.threshold_tokens = threshold_tokens
        self.max_transfer_failures = max_transfer_failures
        self.prefix_index = EventIndex(block_size=block_size) if kv_events else PrefixIndex(block_size=block_size)
        self.decisions: Counter[str] = Counter()

    def execute(self, item: Request) -> Request:
        if item.phase == "embed":  # an embedding is one pass of another model: nothing to split
            return item
        reason = self._decide(item)
        self.decisions[reason] += 1
        item.phase = "prefill" if reason == "pd" else "colocated"
        return item

    def uncached_tokens(self, request: Request, hashes: list[int] | None = None) -> int:
        """The prompt's tokens past its longest prefix sent before under the same salt and adapter (`hashes`: its
        blocks', when the caller has them)."""
        tokens = request.prompt_token_ids or []
        hashes = self.prefix_index.hashes(tokens, prefix_salt(request)) if hashes is None else hashes
        cached = self.prefix_index.cached_tokens(_pool(request), tokens, hashes)
        index = self.prefix_index
        if isinstance(index, EventIndex) and hasattr(self, "ctx"):  # what the engines that publish events hold
            engines = [s for s in self.ctx.instances.values() if s.model == request.model and s.role != "embedding"]
            index.follow(engines)
            followed = [s.name for s in engines if index.follows(s.name)]
            if followed:
                held = max(index.cached_tokens(name, tokens, hashes) for name in followed)
                cached = held if len(followed) == len(engines) else max(cached, held)
        return len(tokens) - cached

    def close(self) -> None:
        if isinstance(self.prefix_index, EventIndex):
            self.prefix_index.close()

    def _decide(self, request: Request) -> str:
        """The reason for this request's phase: "pd" for the PD path, any other reason means colocated."""
        if request.kv_export or request.prefilled is not None:  # one half of a PD pair across servers already
            return "remote_pd"
        if request.prompt_token_ids is not None:
            hashes = self.prefix_index.hashes(request.prompt_token_ids, prefix_salt(request))
            uncached = self.uncached_tokens(request, hashes)
            self.prefix_index.record(_pool(request), request.prompt_token_ids, hashes)
        elif request.model is not None:  # another model's servers: no tokenizer here, so the seeds' estimate
            uncached = estimated_tokens(request)
        else:
            return "no_prompt_tokens"
        prompt_heavy = self.ratio > 0 and uncached > self.ratio * request.sampling.expected_output_tokens
        if uncached < self.threshold_tokens and not prompt_heavy:
            return "short_prompt"
        return self._pd_unavailable(request) or "pd"

    def _pd_unavailable(self, request: Request) -> str | None:
        """Why the PD path cannot take the request now, or None when it can."""
        instances = [s for s in self.ctx.instances.values() if s.model == request.model]
        prefill = _with_role(instances, "prefill")
        if not prefill:
            return "no_prefill_instance"
        if not any(s.healthy for s in prefill):
            return "prefill_unhealthy"
        if all(s.name in request.exclude for s in prefill if s.healthy):  # a retry after each failed it
            return "prefill_failed"
        decode = _with_role(instances, "decode")
        if not decode:
            return "no_decode_instance"
        healthy = [s for s in decode if s.healthy]
        if not healthy:
            return "decode_unhealthy"
        transferring = [s for s in healthy if s.kv_transfer_failures < self.max_transfer_failures]
        if not transferring:
            return "kv_transfer_failing"
        if all(s.saturated for s in transferring):
            return "decode_saturated"
        return None


def estimated_tokens(request: Request) -> int:
    """A prompt's tokens, estimated without its model's tokenizer as four characters each (the control-plane API's
    estimate): what pd_split measures a request for a server's model by, whose tokenizer the gateway lacks."""
    if request.prompt is not None:
        return len(request.prompt) // 4
    contents = (m.get("content") for m in request.messages or ())
    return sum(len(c) if isinstance(c, str) else len(str(c or "")) for c in contents) // 4


def _pool(request: Request) -> str:
    return f"{POOL}:{request.model}" if request.model is not None else POOL


def _with_role(instances: list[InstanceStats], role: str) -> list[InstanceStats]:
    return [s for s in instances if s.role == role]
