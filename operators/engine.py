"""The engine nodes of a pipeline: Step operators around `LLMEngine`, in three roles.

- `engine` (colocated): a request in, its tokens out.
- `prefill`: runs a request's prompt, samples its first token and hands over `PrefillDone` with the prompt's KV.
- `decode`: continues `PrefillDone`s from its own paged cache (and, being a full engine, serves plain requests
  that pd_split kept colocated).

The executor calls `add()` (between steps) and `step()` off the event loop, one at a time, so what an add prepares
(a constraint's matcher, bad words' index) never stalls the loop and the engine is never touched by two threads.
Each step refreshes this node's `InstanceStats` (running requests, queued prefill and decode tokens, measured
tokens/s), which route, pd_split and the policies read. Per-request timings are taken here on the
wall clock against the request's arrival, so they mean the same whichever process served which phase."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import structlog

from sagellm.common import tracing
from sagellm.common.errors import FieldError, InvalidInput, NotFound
from sagellm.common.memory import return_freed_memory
from sagellm.operators.kv_block_serving import BlockServing, exclusive
from sagellm.operators.tracked_request import TrackedRequest
from sagellm.runtime.engine.config import ENGINE_FIELDS, SHORT_NAMES, EngineConfig
from sagellm.runtime.engine.kv_events.publisher import connectable
from sagellm.runtime.engine.outputs import TokenLogprob
from sagellm.runtime.engine.step_trace import StepTraceFile
from sagellm.runtime.multimodal.media_feature import MediaFeature
from sagellm.runtime.multimodal.prompt_media import decoded_media
from sagellm.runtime.pipeline.messages import KVBlocks, PrefillDone, Request, RequestError, TokenDelta
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext, StepOperator, register_operator

log = structlog.get_logger("sagellm.engine")


class EngineOperator(StepOperator):
    """A colocated engine: the whole request, prefill and decode, on this node."""

    name = "engine"
    role: ClassVar[str] = "colocated"
    sleeps = True
    threads_param = "num_threads"
    accepts = (Request, PrefillDone)
    # The engine settings' help is `EngineConfig`'s; these are the node's own.
    parameter_help: ClassVar[dict[str, str]] = {
        "tp": "short for tensor_parallel_size (vLLM's -tp); give one of the two",
        "pp": "short for pipeline_parallel_size (vLLM's -pp); give one of the two",
        "price_per_1k_tokens": "the instance's price, which the cost_optimized policy reads",
    }

    def __init__(
        self, price_per_1k_tokens: float = 0.0, tp: int | None = None, pp: int | None = None, **engine: Any
    ) -> None:
        """The parameters are `EngineConfig`'s settings (`model` defaults to the graph's; `tp` and `pp` short for
        `tensor_parallel_size` and `pipeline_parallel_size`) and the price that cost_optimized reads; a bad value
        raises `FieldError` naming it, which a graph file reports at its line."""
        if price_per_1k_tokens < 0:
            raise FieldError("price_per_1k_tokens", f"price_per_1k_tokens must be >= 0, got {price_per_1k_tokens}")
        for short, value in (("tp", tp), ("pp", pp)):
            if value is not None:
                name = SHORT_NAMES[short]
                if engine.get(name, value) != value:
                    raise FieldError(short, f"{short} and {name} are one setting: give one")
                engine[name] = value
        self.config = EngineConfig(**engine)
        self.price_per_1k_tokens = price_per_1k_tokens
        self._tracked: dict[str, TrackedRequest] = {}
        self._waiting_long = 0  # long prompts the engine holds back behind a running one (`capacity`)
        self.engine: Any = None
        self.step_trace: StepTraceFile | None = None
        self.sleep_level = 0  # 1: its KV cache freed, 2: its weights too (vLLM's sleep mode); 0: awake
        self._model = ""  # the model's path, resolved at open: a sleeping engine is started again from it
        self.blocks = BlockServing()  # its blocks served to the other instances, and the lock that makes it safe

    @classmethod
    def parameters(cls) -> dict[str, tuple[Any, bool]]:
        engine = {name: (hint, False) for name, (hint, _, _) in ENGINE_FIELDS.items()}
        shorts = {short: (int, False) for short in SHORT_NAMES}
        return {**engine, **shorts, "price_per_1k_tokens": (float, False)}

    @classmethod
    def instance_stats(cls, node_id: str, params: dict[str, Any]) -> InstanceStats:
        return cls(**params)._new_stats(node_id)

    def _new_stats(self, node_id: str) -> InstanceStats:
        return InstanceStats(
            node_id, role=self.role, max_running=self.config.max_num_seqs, price_per_1k_tokens=self.price_per_1k_tokens
        )

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        # Imported here, not at the top: listing or validating operators must not load torch.
        from sagellm.runtime.models.model_cache import resolve_model

        model = self.config.model or ctx.graph_attrs.get("model")
        if not model:
            raise InvalidInput(f"node {ctx.node_id!r}: no model (set the graph's `model` or the node's `model`)")
        self._model = str(resolve_model(model))  # a name resolved here
        self._mmproj = self.config.mmproj or ctx.graph_attrs.get("mmproj")
        self._text_only = self.config.language_model_only or bool(ctx.graph_attrs.get("language_model_only"))
        self._start_engine()
        self.step_trace = StepTraceFile.from_env(self.engine, ctx.node_id)  # SAGELLM_STEP_TRACE=DIR: steps timed
        # The executor made this node's stats from the same parameters (route saw them before any engine opened).
        self.stats = ctx.instances.setdefault(ctx.node_id, self._new_stats(ctx.node_id))
        self._refresh_stats()
        self.blocks.start(lambda: self.engine, self.stats)

    def close(self) -> None:
        self.blocks.close()  # first: an answer under way holds the lock
        with self.blocks.lock:
            if self.step_trace is not None:
                self.step_trace.close()
            if self.engine is not None:
                self.engine.close()
            self.engine = None

    def _start_engine(self) -> None:
        """The engine of the model resolved at open (again, after a deep sleep)."""
        from sagellm.runtime.parallel.engine import start_engine

        config = self.config.replace(model=self._model, mmproj=self._mmproj, language_model_only=self._text_only)
        self.engine = start_engine(config)

    # -- sleep mode -------------------------------------------------------------------------------------------------
    @exclusive
    def sleep(self, level: int) -> None:
        """Frees the engine's memory while it holds no request (vLLM's sleep mode): level 1 its KV cache (its
        pages given back, the weights kept; where only a new engine frees the cache, as level 2), level 2 the
        weights too (the engine is closed). Blocking: the gateway calls it off its event loop, between steps."""
        if level not in (1, 2):
            raise FieldError("level", f"level must be 1 (the KV cache) or 2 (the weights too), got {level}")
        if self._tracked:
            raise InvalidInput(f"{self.ctx.node_id}: an engine sleeps only while it holds no request")
        if self.sleep_level >= level:
            return
        if level == 1 and self.engine.release_kv_cache():
            self.sleep_level = 1
        else:
            self.engine.close()
            self.engine = None
            return_freed_memory()
            self.sleep_level = 2
        self.stats.sleep_level = self.sleep_level
        log.info("engine_asleep", node=self.ctx.node_id, level=self.sleep_level)

    @exclusive
    def wake_up(self, level: int = 0) -> None:
        """Makes a sleeping engine serve again (`level` 0): at level 2 a new engine loads the weights (seconds), at
        level 1 the cache is mapped again as it fills. `level` 1, from level 2: the weights alone are loaded (vLLM's
        wake-up of tags=weights; an engine that frees its cache only by closing wakes whole). Blocking, as `sleep`."""
        if level >= self.sleep_level:
            return
        if self.sleep_level == 2:
            self._start_engine()
            if self.step_trace is not None:  # it timed the engine that was closed
                self.step_trace.close()
                self.step_trace = StepTraceFile.from_env(self.engine, self.ctx.node_id)
            self.sleep_level = 1 if level == 1 and self.engine.release_kv_cache() else 0
        if self.sleep_level == 1 and level == 0:
            self.engine.restore_kv_cache()
            self.sleep_level = 0
        self.stats.sleep_level = self.sleep_level
        self._refresh_stats()
        log.info("engine_awake" if not self.sleep_level else "engine_weights_loaded", node=self.ctx.node_id)

    # -- the Step contract ------------------------------------------------------------------------------------------
    @exclusive
    def add(self, item: Any) -> list[Any]:
        rid = item.request_id
        if rid in self._tracked:
            return [RequestError(request_id=rid, code="invalid_request", message=f"request id {rid!r} is in use")]
        request = item.request if isinstance(item, PrefillDone) else item
        self._tracked[rid] = tracked = TrackedRequest.of(request)
        try:
            if isinstance(item, PrefillDone) or request.prefilled is not None:
                done = item if isinstance(item, PrefillDone) else _from_server(request)
                tracked.metrics.num_cached_tokens, tracked.prefilled_elsewhere = done.num_cached_tokens, True
                out = self.engine.add_prefilled_request(
                    rid, request.prompt_token_ids, request.sampling, done.first_token, done.kv.data,
                    resumed_tokens=request.resumed_tokens, cache_salt=request.cache_salt, states=done.kv.states,
                    lora_request=request.lora, multi_modal_data=_media(request),
                )  # fmt: skip
                item = done
                now = time.time()  # the KV is in this engine's cache: the hand-over from the prefill worker is over
                tracing.record("kv_transfer", request.trace, done.first_token_time, now,
                               {"sagellm.node": self.ctx.node_id, "sagellm.kv_tokens": done.kv.num_tokens})  # fmt: skip
                items = self._emit(out, now)
                if tracked.metrics.first_token_time is not None:
                    tracked.metrics.kv_handover_s = tracked.metrics.first_token_time - item.first_token_time
                if item.first_logprob is not None:  # the prefill worker sampled the first token
                    items[0].logprobs = [item.first_logprob]
                items[0].prompt_logprobs = item.prompt_logprobs  # ... and scored the prompt
                return items
            prompt = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
            self.engine.add_request(
                rid, prompt or "", request.sampling, priority=request.priority, prefill_only=self.role == "prefill",
                export_kv=request.kv_export, resumed_tokens=request.resumed_tokens, group=request.group,
                cache_salt=request.cache_salt, lora_request=request.lora, multi_modal_data=_media(request),
                peer_prefix=request.peer_prefix,
            )  # fmt: skip
        except (ValueError, NotFound) as exc:  # (a LoRA adapter's directory that is not there)
            del self._tracked[rid]
            code = "not_found" if isinstance(exc, NotFound) else "invalid_request"
            return [RequestError(request_id=rid, code=code, message=str(exc))]
        finally:
            self._refresh_stats()
        return []

    @exclusive
    def step(self) -> list[Any]:
        started = time.perf_counter()
        began = time.time()
        outputs = self.engine.step()
        if self.step_trace is not None:
            self.step_trace.flush()
        now = time.time()
        if tracing.enabled():
            self._note_prefill_chunks(began, now)
        items = [item for out in outputs for item in self._emit(out, now)]
        elapsed = time.perf_counter() - started
        tokens = self.engine.last_step_prompt_tokens
        if tokens and elapsed > 0:  # prompt tokens per second, decodes of the step included: predicts TTFTs
            self.stats.tokens_per_s = 0.8 * self.stats.tokens_per_s + 0.2 * (tokens / elapsed)
        self._refresh_stats()
        return items

    def has_work(self) -> bool:
        return self.engine is not None and self.engine.has_unfinished_requests()

    def capacity(self) -> int:
        """Requests this engine takes now: as many as it can run at once (none while it sleeps), so a policy queue
        upstream keeps the rest and decides their order. Long prompts waiting in the engine for a running one to be
        through hold no seat yet (`runtime/engine/long_prefills.py`): as many more (up to a batch) come in and start
        ahead of them, so short requests are not held upstream behind long ones."""
        free = self.config.max_num_seqs - len(self._tracked) + min(self._waiting_long, self.config.max_num_seqs)
        return 0 if self.sleep_level else max(0, free)

    def in_flight(self) -> list[str]:
        return list(self._tracked)

    @exclusive
    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self.engine is not None:
                self.engine.abort_request(rid)
            self._tracked.pop(rid, None)
        self._refresh_stats()

    def _note_prefill_chunks(self, began: float, now: float) -> None:
        """The traced requests' prompt chunks computed by the step that ran from `began` to `now`."""
        for rid, tokens in self.engine.last_step_prefills:
            tracked = self._tracked.get(rid)
            if tracked is not None and tracked.request.trace is not None:
                tracked.chunks.append((began, now, tokens))

    # -- outputs ------------------------------------------------------------------------------------------------
    def _emit(self, out: Any, now: float) -> list[Any]:
        tracked = self._tracked[out.request_id]
        completion = out.outputs[0]
        if out.error is not None:  # the engine ended this request alone: a step failed on its data
            del self._tracked[out.request_id]
            tracked.span(self.name, self.ctx.node_id, now, error=out.error_code)
            message = out.error if out.error_code == "invalid_request" else f"{self.ctx.node_id}: {out.error}"
            return [RequestError(request_id=out.request_id, code=out.error_code, message=message, time=now)]
        if out.kv is not None and tracked.request.kv_export:  # prefilled for another server: the KV goes back
            del self._tracked[out.request_id]
            tracked.token(now, 1)
            tracked.metrics.num_prompt_tokens = len(out.prompt_token_ids)
            tracked.metrics.num_cached_tokens = out.metrics.num_cached_tokens
            reason = "length" if completion.finish_reason == "prefilled" else completion.finish_reason
            kv = KVBlocks(num_tokens=int(out.kv.shape[2]), data=out.kv, states=out.states)
            first = completion.token_ids_delta
            tracked.span("prefill", self.ctx.node_id, now, **{"sagellm.kv_export": True})
            return [
                TokenDelta(
                    request_id=out.request_id, token_ids=list(first), text=completion.text_delta, time=now,
                    finish_reason=reason, metrics=tracked.finish(now), kv=kv,
                )
            ]  # fmt: skip
        if completion.finish_reason == "prefilled":
            del self._tracked[out.request_id]
            kv = KVBlocks(num_tokens=int(out.kv.shape[2]), data=out.kv, states=out.states)
            cached = out.metrics.num_cached_tokens
            tracked.metrics.num_prompt_tokens, tracked.metrics.num_cached_tokens = len(out.prompt_token_ids), cached
            tracked.token(now, 1)
            tracked.span("prefill", self.ctx.node_id, now)
            done = PrefillDone(
                request_id=out.request_id,
                request=tracked.request,
                first_token=completion.token_ids[0],
                first_token_time=now,
                kv=kv,
                num_cached_tokens=cached,
                first_logprob=_logprobs(completion, 1)[0] if completion.logprobs else None,
                prompt_logprobs=out.prompt_logprobs,
            )
            return [done]
        new_ids = list(completion.token_ids_delta)
        first = tracked.metrics.first_token_time is None
        tracked.token(now, len(new_ids))
        tracked.metrics.num_prompt_tokens = len(out.prompt_token_ids)
        delta = TokenDelta(request_id=out.request_id, token_ids=new_ids, text=completion.text_delta, time=now)
        if completion.logprobs:
            delta.logprobs = _logprobs(completion, len(new_ids))
        if first:
            delta.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            del self._tracked[out.request_id]
            delta.finish_reason, delta.stop_reason = completion.finish_reason, completion.stop_reason
            if not tracked.prefilled_elsewhere:
                tracked.metrics.num_cached_tokens = out.metrics.num_cached_tokens
                tracked.metrics.cached_tokens_by_tier = out.metrics.cached_tokens_by_tier
            tracked.metrics.num_preemptions = out.metrics.num_preemptions
            delta.metrics = tracked.finish(now)
            tracked.span(self.name, self.ctx.node_id, now, **{"gen_ai.response.finish_reasons": [delta.finish_reason]})
        return [delta]

    def _refresh_stats(self) -> None:
        if self.engine is None:  # asleep at level 2
            return
        engine = self.engine.stats()
        self.stats.running = len(self._tracked)
        self.stats.waiting = engine.num_waiting
        self.stats.kv_cache_usage = engine.kv_cache_usage
        self.stats.prefix_cache_queries = engine.prefix_cache_queries
        self.stats.prefix_cache_hits = engine.prefix_cache_hits
        self.stats.spec_decode_num_drafts = engine.spec_decode_num_drafts
        self.stats.spec_decode_num_draft_tokens = engine.spec_decode_num_draft_tokens
        self.stats.spec_decode_num_accepted_tokens = engine.spec_decode_num_accepted_tokens
        self.stats.threads = engine.num_threads
        events = getattr(self.engine, "kv_events", None)
        publisher = events.publisher if events is not None else None
        if publisher is not None:
            self.stats.kv_events_endpoint = connectable(publisher.endpoint)
            self.stats.kv_events_replay_endpoint = connectable(publisher.replay_endpoint)
        if engine.kv_offload is not None:
            tiers = engine.kv_offload
            self.stats.kv_offload_ram_bytes, self.stats.kv_offload_disk_bytes = tiers.ram_bytes, tiers.disk_bytes
            self.stats.kv_offload_stored_blocks = tiers.stored_blocks
            self.stats.kv_offload_loaded_blocks = tiers.loaded_blocks
        self.stats.queued_prefill_tokens = engine.pending_prefill_tokens
        self.stats.queued_decode_tokens = engine.pending_decode_tokens
        self._waiting_long = engine.num_waiting_long  # read by `capacity()` on the event loop, between refreshes


def _from_server(request: Request) -> PrefillDone:
    """A request another server prefilled (`Request.prefilled`), as a prefill worker's hand-over. The gateway sets
    it in one place (`KVHandOff.take`), from a prefill server its operator listed (`openai/kv_transfer/peers.py`);
    its KV enters this engine's prefix cache only if it is this prompt's, as checked here."""
    prefilled = request.prefilled
    if prefilled.prompt_token_ids != request.prompt_token_ids:
        raise ValueError(
            f"kv_transfer_params: the remote prefill's {len(prefilled.prompt_token_ids)} prompt tokens are not this "
            f"request's {request.num_prompt_tokens} (another prompt, or another model's tokenizer)"
        )
    return PrefillDone(
        request_id=request.request_id, request=request, first_token=prefilled.first_token,
        first_token_time=request.arrival_time, kv=prefilled.kv,
    )  # fmt: skip


def _logprobs(completion: Any, count: int) -> list[TokenLogprob]:
    """The engine's logprobs of the last `count` tokens: the structs pipeline items carry."""
    return completion.logprobs[-count:]


register_operator(EngineOperator)


@register_operator
class PrefillOperator(EngineOperator):
    """A prefill worker: each request's prompt and first token, then its KV goes to a decode worker."""

    name = "prefill"
    role = "prefill"
    accepts = (Request,)

    def _start_engine(self) -> None:
        super()._start_engine()
        from sagellm.runtime.comm import shared_memory

        ctx = self.ctx
        cpu = self.engine.backend.device.type == "cpu"
        leaves = bool(ctx.remote_outputs) and ctx.graph_attrs.get("shared_memory", True)
        if cpu and leaves and shared_memory.available():
            # The KV is gathered straight into shared memory: a decode worker on this host maps it, nothing copied.
            self.engine.kv_buffer = shared_memory.arena().empty


@register_operator
class DecodeOperator(EngineOperator):
    """A decode worker: continues prefilled requests from their transferred KV; serves colocated ones whole."""

    name = "decode"
    role = "decode"


# The operators that run an LLMEngine in their process (what a gateway reports the memory of and puts to sleep).
ENGINE_OPERATORS = (EngineOperator.name, PrefillOperator.name, DecodeOperator.name)


def _media(request: Request) -> dict[str, Any] | None:
    """A request's images and audio as the engine takes them (vLLM's multi_modal_data): decoded from the files it
    carries, or the pictures an `encode` node encoded (its prompt then came expanded)."""
    data = decoded_media(None if request.encoded_images else request.images, request.audios)
    if request.encoded_images:
        data["encoded"] = [MediaFeature("image", e.hash, e.offset, e.length, None, e.embeds, e.grid)
                           for e in request.encoded_images]  # fmt: skip
    return data or None
