"""The engine: requests in, token deltas out, one `step()` at a time.

    step = schedule -> run the model -> sample -> append tokens, detokenize, check stops

It knows nothing of sockets or event loops; the offline `LLM`, the prefill/decode operators and the servers all
drive it through `add_request` / `step` / `abort_request`."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import torch

from sagellm.backends import get_backend
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.common.memory import drop_mapped_pages, return_freed_memory
from sagellm.common.progress import stage
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.detokenizer import IncrementalDetokenizer
from sagellm.runtime.engine.grammar import (
    GrammarCompiler,
    GuidedMatcher,
    grammar_compiler,
    mask_logits,
    new_masks,
    restrictions_refusal,
)
from sagellm.runtime.engine.kv_budget import kv_cache_blocks, window_group_blocks
from sagellm.runtime.engine.kv_cache import token_slots, uniform_window, window_group
from sagellm.runtime.engine.lora_slots import LoRARequest, LoraSlots
from sagellm.runtime.engine.lora_weights import LoraWeights, adapted_shapes
from sagellm.runtime.engine.memory_report import memory_report
from sagellm.runtime.engine.model_runner import ModelRunner, RunnerLostError, cache_config
from sagellm.runtime.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from sagellm.runtime.engine.penalties import BadWords, bad_word_token_ids
from sagellm.runtime.engine.placement import place
from sagellm.runtime.engine.prompt import request_token_problem
from sagellm.runtime.engine.sampler import Sampler, make_generator, token_logprobs
from sagellm.runtime.engine.sampling_params import SamplingParams, model_sampling_defaults
from sagellm.runtime.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.config import FIELD, parse_speculative_config, reads_mtp_head
from sagellm.runtime.engine.speculative.proposers import ProposerContext, TargetHead, TargetStep
from sagellm.runtime.engine.speculative.speculator import Speculator
from sagellm.runtime.engine.speculative.verify import SpecDecodeStats, accepted_tokens, sampled_rows
from sagellm.runtime.engine.state_cache import bytes_per_state_slot
from sagellm.runtime.engine.thinking import ThinkingTracker
from sagellm.runtime.engine.window_blocks import WindowedBlocks
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.lora_adapter import LoraAdapter
from sagellm.runtime.models.mtp_head import SHARED_WEIGHTS, head_weights, is_head_weight, with_head_layer
from sagellm.runtime.models.pipeline_stages import PipelineStage
from sagellm.runtime.models.tensor_parallel import TensorShard

log = structlog.get_logger("sagellm.engine")
SCORED_ROWS_AT_ONCE = 256  # prompt positions scored per log_softmax: bounds its [rows, vocab] copy on long prompts


@dataclass(eq=False)
class _RequestState:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    logprobs: list | None = None
    prefill_only: bool = False  # a prefill worker's request: stop after the first token and hand over the KV
    export_kv: bool = False  # prefill_only, and the KV goes out even when the first token ended the request
    matcher: GuidedMatcher | None = None  # where a guided request stands in its grammar
    thinking: ThinkingTracker | None = None  # where a budgeted request stands with its thinking


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        *,
        make_runner: Callable[..., ModelRunner] = ModelRunner,
    ) -> None:
        """`make_runner` takes `ModelRunner`'s arguments: a tensor parallel group's is rank 0's runner, which starts
        the other ranks (`sagellm.runtime.parallel.engine.start_engine` gives it)."""
        if config.world_size > 1 and make_runner is ModelRunner:
            raise InvalidInput(
                "tensor_parallel_size or pipeline_parallel_size > 1 needs ranks in other processes: start the engine "
                "with sagellm.runtime.parallel.engine.start_engine"
            )
        if config.seed is not None:
            torch.manual_seed(config.seed)  # unseeded rows draw from the global generator (the sampler)
        if loaded is None and not config.model:
            raise InvalidInput("EngineConfig.model: give the path of the model to load")
        self.config = config
        spec = parse_speculative_config(config.speculative_config)
        mtp = reads_mtp_head(config.speculative_config)  # the model's own head guesses: read with the model
        if mtp and config.world_size > 1:
            raise FieldError(FIELD, f"{FIELD}: method mtp runs on a single-process engine (no tensor or pipeline "
                                    "parallel yet)")  # fmt: skip
        self.model = loaded or load_model(config.model, mtp_head=mtp)
        if self.model.tokenizer is None:
            raise ModelLoadError(f"{self.model.source}: the engine needs a tokenizer, and this model has none")
        self.tokenizer = self.model.tokenizer
        self.sampling_defaults = model_sampling_defaults(self.model)  # what a request that sets nothing gets
        model_config = self.model.config
        if model_config.one_pipeline_stage and (config.pipeline_parallel_size or 1) > 1:
            raise InvalidInput("pipeline parallel: Gemma 4 and Gemma 3n (per-layer embeddings, shared KV, layer "
                               "scalars, AltUp) run as one pipeline stage; split them with tensor_parallel_size "
                               "instead")  # fmt: skip
        self.backend = get_backend(config.backend)
        linear_dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
        if problem := self.backend.linear_dtype_problem(linear_dtype):
            raise FieldError("dtype", f"dtype {config.dtype}: {problem}")
        if config.world_size == 1:  # a group's rank 0 is placed by its runner, with the other ranks
            place(self.backend, config.device_ids, config.num_threads)
        # The budget is each rank's: rank 0 holds the most KV heads, linear attention heads and layers of a group.
        rank0 = cache_config(
            model_config,
            TensorShard(0, config.tensor_parallel_size or 1),
            PipelineStage(0, config.pipeline_parallel_size or 1),
        )
        max_len = config.max_model_len or model_config.max_position_embeddings
        # An MTP head's one layer keeps KV in as many blocks: the budget holds its layer too.
        budgeted = with_head_layer(rank0) if mtp else rank0
        num_blocks = kv_cache_blocks(config, budgeted, max_len, self.backend.device.type)
        num_blocks, window_blocks = window_group_blocks(config, rank0, num_blocks, max_len)
        # A model with recurrent layers (Qwen3.5): a state slot per seat, and as many for the prefix cache's
        # checkpoints of them (state_slots.py).
        num_state_slots = config.max_num_seqs if model_config.num_linear_layers else 0
        checkpoints = num_state_slots if config.enable_prefix_caching else 0
        rollbacks = num_state_slots if spec is not None else 0  # where a step keeps states from before its proposals
        if num_state_slots:
            per_sequence = round(bytes_per_state_slot(rank0) / 2**20, 1)
            log.info("state_slots", seats=num_state_slots, checkpoints=checkpoints, rollbacks=rollbacks,
                     mib_per_slot=per_sequence)  # fmt: skip
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                num_blocks=num_blocks,
                block_size=config.block_size,
                window=window_group(rank0) if window_blocks else uniform_window(rank0),
                num_window_blocks=window_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
                scheduling_policy=config.scheduling_policy,
                long_prefill_token_threshold=config.long_prefill_token_threshold,
                max_num_partial_prefills=config.max_num_partial_prefills,
                max_long_partial_prefills=config.max_long_partial_prefills,
                long_prefill_context_scale=3 * model_config.hidden_size,  # where attention costs the linears' (CPU)
                num_state_slots=num_state_slots,
                num_state_checkpoints=checkpoints,
                speculative=spec is not None,
            )
        )
        self.lora, lora_weights = self._lora_slots(spec is not None) if config.enable_lora else (None, None)
        with stage(f"preparing the weights for the {self.backend.name} backend"):
            self.runner = make_runner(
                model_config,
                self.model.weights,
                self.backend,
                num_blocks=num_blocks,
                block_size=config.block_size,
                max_model_len=self.max_model_len,
                quantized=self.model.quantized if config.quantized_weights else {},
                prefault_kv_cache=config.prefault_kv_cache,
                linear_dtype=linear_dtype,
                mapped=self.model.mapped,
                **({"num_state_slots": num_state_slots + checkpoints + rollbacks} if num_state_slots else {}),
                **({"window_blocks": window_blocks} if window_blocks else {}),
                **({"graph": build_decoder_graph(model_config, hidden_states=True)} if mtp else {}),
                **({"lora": lora_weights} if lora_weights is not None else {}),
            )
        if self.lora is not None:
            self.lora.load = self.runner.load_lora
        head = self._mtp_head(model_config) if mtp else None
        # The plan holds what it needs (packed): drop the loader's copies, and give their memory back.
        self.model.weights, self.model.quantized = {}, {}
        return_freed_memory()
        drop_mapped_pages(self.model.mapped)
        self.eos_token_ids = set(model_config.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids)
        self.speculator: Speculator | None = None
        if spec is not None:
            with stage(f"preparing speculative decoding ({spec.method})"):
                context = ProposerContext(self.tokenizer, model_config.vocab_size, self.backend, num_blocks,
                                          config.block_size, self.max_model_len, config.max_num_seqs,
                                          head)  # fmt: skip
                self.speculator = Speculator(spec, context, config.max_num_batched_tokens)
        # An MTP head keeps KV of its own, which a prefill worker's hand-over carries after the model's.
        self._head_kv = self.speculator.proposer if self.speculator is not None and mtp else None
        self._requests: dict[str, _RequestState] = {}
        # Requests whose LoRA adapter waits for a free slot, in arrival order, each with its group (`add_request`).
        self._lora_waiting: list[tuple[Sequence, LoraAdapter, str | None]] = []
        # A request's choices share its prompt (`add_request`'s group): the first prefills it, the others wait here
        # until its KV is in the prefix cache, then each computes only the prompt's last, partial block.
        self._group_leaders: dict[str, Sequence] = {}
        self._parked: dict[str, list[Sequence]] = {}
        # Where a prefill's KV is gathered for its hand-over, (shape, dtype) -> tensor: shared memory when it leaves
        # the process (set by the prefill operator), so sending it copies nothing more; None: a new tensor.
        self.kv_buffer: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None
        self.last_step_prompt_tokens = 0
        self._grammars: GrammarCompiler | None = None  # made with the first guided request
        self._mask_filler: ThreadPoolExecutor | None = None  # fills guided rows' masks while the model runs
        log.info(
            "engine_ready",
            model=self.model.name,
            backend=self.backend.name,
            kv_blocks=num_blocks,
            block_size=config.block_size,
            max_model_len=self.max_model_len,
            memory=memory_report([self.runner]).line(),  # this process's: weights, KV cache, the rest
        )

    # -- requests -----------------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        prefill_only: bool = False,
        export_kv: bool = False,
        resumed_tokens: int = 0,
        group: str | None = None,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queues a request. With `prefill_only` (a prefill worker), it ends after its first token with finish reason
        "prefilled" and its prompt's KV in `RequestOutput.kv`, unless that token already finished it. `export_kv`
        (prefill for another server): ends after its first token too, its KV out whatever that token's finish
        reason, since the server that decodes it applies the request's own limits.
        `resumed_tokens`: the prompt ends with that many tokens another engine generated for this request (a resume):
        the text continues from them as that engine's would have. `group`: requests of one group share their
        prompt (the `n` choices of one request, each added with `SamplingParams.choice`): its blocks are computed
        and held once. `cache_salt`: its prompt shares cached blocks only with prompts of the same salt.
        `lora_request`: the LoRA adapter it is generated with (an engine with enable_lora)."""
        if params.n != 1:
            raise InvalidInput(f"n={params.n}: add each choice on its own (SamplingParams.choice) in one group")
        adapter = self._lora_adapter(lora_request)
        cache_salt = _salted(cache_salt, adapter)
        seq, state = self._new_request(request_id, prompt, params, priority, resumed_tokens, cache_salt=cache_salt)
        state.prefill_only, state.export_kv = prefill_only or export_kv, export_kv
        if adapter is not None and not self._take_lora_slot(seq, adapter):
            self._lora_waiting.append((seq, adapter, group))
            return
        self._enqueue(seq, group)

    def _enqueue(self, seq: Sequence, group: str | None) -> None:
        """Into the scheduler, or parked until its group's prompt is computed."""
        leader = self._group_leaders.get(group) if group is not None else None
        if leader is not None and not _prompt_computed(leader):
            self._parked.setdefault(group, []).append(seq)
            return
        if group is not None:
            self._group_leaders[group] = seq
        self.scheduler.add(seq)

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first_token: int,
        kv: torch.Tensor,
        *,
        priority: int = 0,
        resumed_tokens: int = 0,
        cache_salt: str | None = None,
        states: torch.Tensor | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestOutput:
        """Continues a request a prefill worker started: its prompt's KV `kv` [num_layers, 2, prompt_len, Hk, D]
        goes into this engine's own cache (blocks already cached here are shared, not written), with a model with
        recurrent layers its `states` after the prompt into a state slot when it is admitted, and `first_token` is
        appended as if sampled here. Returns the first token's output. Without room for the blocks, or without the
        states such a model needs, the prompt is recomputed instead: slower, same tokens."""
        adapter = self._lora_adapter(lora_request)
        cache_salt = _salted(cache_salt, adapter)
        seq, state = self._new_request(
            request_id, prompt_token_ids, params, priority, resumed_tokens, scored=True, cache_salt=cache_salt
        )
        n = seq.num_prompt_tokens
        if kv.shape[2] != n:
            del self._requests[request_id]
            raise ValueError(f"KV covers {kv.shape[2]} tokens, the prompt has {n}")
        layers = self.model.config.num_kv_layers  # past them, a prefill worker's MTP head's layer
        kv, head_kv = kv[:layers], (kv[layers:] if kv.shape[0] > layers and self._head_kv is not None else None)
        if states is not None and states.numel() != self.runner.states_size:
            del self._requests[request_id]
            raise ValueError(f"recurrent states of {states.numel()} values; this model's are {self.runner.states_size}")

        def write_kv(start: int) -> None:
            slots, window_slots = self._kv_slots(seq, start, n)
            self.runner.write_kv(slots, kv[:, :, start:], window_slots)
            if head_kv is not None:
                self._head_kv.write_kv(seq, slots, head_kv[:, :, start:])

        seq.imported_states = states if self.scheduler.state_slots is not None else None
        if not self.scheduler.import_prompt(seq, write_kv):
            why = "no_states" if self.scheduler.state_slots is not None and states is None else "no_room"
            log.warning("kv_import_recomputed", request_id=request_id, prompt_tokens=n, why=why)
            seq.imported_states = None
        seq.first_scheduled_time = time.time()
        waits = adapter is not None and not self._take_lora_slot(seq, adapter)
        output = self._append(seq, [first_token], [None], seq.first_scheduled_time)
        if seq.is_finished:
            return output
        if waits:  # its KV stays in its blocks until its adapter has a slot
            self._lora_waiting.append((seq, adapter, None))
        else:
            self.scheduler.add(seq)
        return output

    def _kv_slots(self, seq: Sequence, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cache slots of `seq`'s positions [start, end), and where its sliding-window layers keep blocks of
        their own (window_blocks.py), theirs; -1 for a position a sliding group has passed (in the one group too,
        when every layer slides)."""
        bs, device, blocks = self.runner.block_size, self.runner.device, self.scheduler.block_manager
        if not isinstance(blocks, WindowedBlocks):  # one group, which slides when every layer does
            return token_slots(seq.block_table, start, end, bs, device, blocks.null_block), None
        slots = token_slots(seq.block_table, start, end, bs, device)
        return slots, token_slots(seq.window_table, start, end, bs, device, blocks.sliding.null_block)

    def _new_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int,
        resumed_tokens: int = 0,
        scored: bool = False,
        cache_salt: str | None = None,
    ) -> tuple[Sequence, _RequestState]:
        """`scored`: the prompt's logprobs, if asked for, were computed where it was prefilled; a resumed request's
        were too, on its first run."""
        if request_id in self._requests:
            raise InvalidInput(f"request id {request_id!r} is already running")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, token_ids = None, list(prompt)
        vocab = self.model.config.vocab_size
        problem = request_token_problem(token_ids, params, vocab)
        if problem is not None:
            raise InvalidInput(problem)
        budget = self.max_model_len - len(token_ids)
        if budget <= 0:
            raise InvalidInput(
                f"prompt has {len(token_ids)} tokens; this engine's context is {self.max_model_len} tokens"
            )
        matcher = self._matcher(params, token_ids[len(token_ids) - resumed_tokens :]) if params.guided else None
        seq = Sequence(request_id, token_ids, params, make_generator(params.seed), priority)
        seq.resumed_tokens, seq.cache_salt = resumed_tokens, cache_salt
        if params.prompt_logprobs is not None and not (scored or resumed_tokens):
            seq.prompt_logprobs = [None]
        if params.bad_words:  # tokenized where the prompt was (off the event loop), else here
            sequences = params.bad_words_token_ids
            seq.bad_words = BadWords(
                sequences if sequences is not None else bad_word_token_ids(self.tokenizer, params.bad_words, vocab)
            )
        if matcher is not None and (refusal := restrictions_refusal(matcher, params, seq, self.eos_token_ids, vocab)):
            raise InvalidInput(refusal)
        detok = IncrementalDetokenizer.from_params(self.tokenizer, token_ids, params, resumed_tokens)
        metrics = RequestMetrics(arrival_time=seq.arrival_time, num_prompt_tokens=len(token_ids))
        logprobs = [] if params.logprobs is not None else None
        state = _RequestState(seq, text, detok, metrics, logprobs, matcher=matcher)
        if params.thinking is not None:
            state.thinking = ThinkingTracker(params.thinking)
            for token in token_ids[len(token_ids) - resumed_tokens :]:  # a resume: where the output so far stands
                state.thinking.accept(token, self.tokenizer.decode([token]))
        self._requests[request_id] = state
        return seq, state

    def _matcher(self, params: SamplingParams, generated: list[int]) -> GuidedMatcher:
        """A guided request's matcher, past the tokens already `generated` for it (by another engine, before a
        resume): its grammar compiled on first use in this process, then cached."""
        if self._grammars is None:
            self._grammars = grammar_compiler(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)
        matcher = self._grammars.matcher(params.guided)
        for token in generated:
            if not matcher.accept(token):
                raise InvalidInput(f"the tokens generated before the resume do not follow the {params.guided.kind}")
        return matcher

    def abort_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None and not state.seq.is_finished:
            for parked in self._parked.values():
                if state.seq in parked:
                    parked.remove(state.seq)
            self._lora_waiting = [w for w in self._lora_waiting if w[0] is not state.seq]
            self._finish(state.seq, "abort")
        self._release_parked()

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Ends `seq` in the scheduler (its blocks freed) and gives its adapter's slot back."""
        self.scheduler.finish(seq, reason)
        if self.lora is not None and seq.lora_slot >= 0:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = -1

    # -- LoRA adapters ------------------------------------------------------------------------------------------
    def _lora_slots(self, speculative: bool) -> tuple[LoraSlots, LoraWeights]:
        """The adapters' slots over every weight of the model they may change, and this process's weights of them
        (read before the loader's copies are dropped)."""
        if speculative:
            raise FieldError("enable_lora", "enable_lora: LoRA adapters run on an engine without speculative "
                                            "decoding (yet)")  # fmt: skip
        shapes = adapted_shapes(self.model.weights, self.model.quantized)
        if not shapes:
            raise FieldError("enable_lora", f"enable_lora: {self.model.name} has no weight LoRA adapters change")
        kernel = self.backend.kernels().get("add_lora")
        if kernel is None:
            raise FieldError("enable_lora", f"enable_lora: the {self.backend.name} backend has no add_lora kernel")
        config = self.config
        weights = LoraWeights(shapes, config.max_loras, config.max_lora_rank, kernel, self.backend.device)
        return LoraSlots(shapes, config.max_loras, config.max_lora_rank), weights

    def _lora_adapter(self, request: LoRARequest | None) -> LoraAdapter | None:
        if request is None:
            return None
        if self.lora is None:
            raise InvalidInput(f"LoRA adapter {request.lora_name}: this engine serves none (start it with "
                               "enable_lora)")  # fmt: skip
        return self.lora.adapter(request)

    def _take_lora_slot(self, seq: Sequence, adapter: LoraAdapter) -> bool:
        assert self.lora is not None
        slot = self.lora.acquire(adapter)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _admit_lora_waiting(self) -> None:
        """Queues the requests whose adapter has a slot now, in arrival order (one that finds none keeps the rest
        waiting behind it)."""
        while self._lora_waiting:
            seq, adapter, group = self._lora_waiting[0]
            if not self._take_lora_slot(seq, adapter):
                return
            self._lora_waiting.pop(0)
            if seq.num_computed_tokens:  # prefilled elsewhere: decodes from its imported KV
                self.scheduler.add(seq)
            else:
                self._enqueue(seq, group)

    def _release_parked(self) -> None:
        """Queues the requests that waited for their group's prompt, once it is computed (or its first request
        ended without computing it: the next one then leads)."""
        for group, leader in list(self._group_leaders.items()):
            if _prompt_computed(leader):
                del self._group_leaders[group]
                parked = self._parked.pop(group, [])
                if parked and leader.num_computed_tokens < leader.num_prompt_tokens:  # ended first: the next leads
                    self._group_leaders[group] = parked[0]
                    self._parked[group] = parked[1:]
                    parked = parked[:1]
                for seq in parked:
                    self.scheduler.add(seq)

    def close(self) -> None:
        """Stops what the engine started besides itself (a tensor parallel group's ranks, the mask thread)."""
        self.runner.close()
        if self.speculator is not None:
            self.speculator.close()
        if self._mask_filler is not None:
            self._mask_filler.shutdown(wait=False)

    def release_kv_cache(self) -> bool:
        """Gives the KV cache's memory back while the engine holds no request (vLLM's sleep level 1), keeping the
        weights: its prefix cache is forgotten (the blocks read as zeros after). False, and nothing changed, where
        only a whole new engine frees it: a parallel group, a speculator with caches of its own, another device."""
        if self.has_unfinished_requests():
            raise InvalidInput("the engine's KV cache is freed only while it holds no request")
        if self.config.world_size > 1 or self.speculator is not None or not self.runner.release_kv_cache():
            return False
        self.scheduler.block_manager.reset_prefix_cache()
        return_freed_memory()
        return True

    def restore_kv_cache(self) -> None:
        """Serves again after `release_kv_cache` (its pages are mapped as it writes)."""
        self.runner.restore_kv_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or any(self._parked.values()) or bool(self._lora_waiting)

    def stats(self) -> EngineStats:
        """The engine's load now, for whoever places requests on engines."""
        parked = [seq for group in self._parked.values() for seq in group]
        waiting = [*self.scheduler.waiting, *parked] if parked else self.scheduler.waiting
        running = self.scheduler.running
        blocks = self.scheduler.block_manager
        spec = self.speculator.stats if self.speculator is not None else SpecDecodeStats()
        prefill = sum(s.num_tokens - s.num_computed_tokens for s in waiting) + sum(
            s.num_tokens - s.num_computed_tokens - 1 for s in running if s.num_computed_tokens < s.num_prompt_tokens
        )
        decode = sum(
            s.params.expected_output_tokens - s.num_output_tokens
            for s in (*waiting, *running)
            if not self._requests[s.request_id].prefill_only  # decoded on another engine
        )
        return EngineStats(
            num_waiting=len(waiting),
            num_running=len(running),
            kv_cache_usage=blocks.usage,
            prefix_cache_queries=blocks.prefix_queries,
            prefix_cache_hits=blocks.prefix_hits,
            pending_prefill_tokens=prefill,
            pending_decode_tokens=decode,
            num_waiting_long=self.scheduler.num_held_back(),
            spec_decode_num_drafts=spec.num_drafts,
            spec_decode_num_draft_tokens=spec.num_draft_tokens,
            spec_decode_num_accepted_tokens=spec.num_accepted_tokens,
        )

    def _mtp_head(self, model_config: ModelConfig) -> TargetHead:
        """The model's MTP head, for its proposer: its weights (the model's embeddings and lm_head among them) and
        the runner's packed lm_head (the head's layer 0 is not the model's, though named alike)."""
        weights = head_weights(self.model.weights)
        if not model_config.num_mtp_layers or not any(is_head_weight(name) for name in weights):
            raise FieldError(FIELD, f"{FIELD}: method mtp: {self.model.source} has no multi-token prediction head "
                                    "(Qwen3.5 and Qwen3-Next checkpoints carry one)")  # fmt: skip
        shared = {name: self.runner.packed[name] for name in SHARED_WEIGHTS if name in self.runner.packed}
        return TargetHead(model_config, weights, shared)

    # -- the loop -----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        self._release_parked()
        self._admit_lora_waiting()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self._may_speculate)
        batch = self.scheduler.schedule()
        for seq in batch.seqs:  # admitted with states a prefill worker computed: into its slot before it runs
            if seq.imported_states is not None:
                self.runner.write_states(seq.state_slot, seq.imported_states)
                seq.imported_states = None
        # Prompt tokens computed this step: the operators' prefill rate, which predicts a request's wait for its first
        # token (decode steps, and the tokens proposed to them, would say nothing of it).
        self.last_step_prompt_tokens = sum(batch.num_new_tokens[batch.num_decodes :])
        if not batch:
            return []
        # A step of decoding rows only (each sequence's next token and its proposals) is what speculation weighs.
        decoding = all(s.num_sampled_rows(n) == n for s, n in zip(batch.seqs, batch.num_new_tokens))
        outputs = self._run(batch)
        if self.speculator is not None:
            self.speculator.keep_only(self.scheduler.running)
            if decoding:
                self.speculator.step_took(batch.total_tokens, time.perf_counter() - started)
        return outputs

    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Runs a scheduled batch, samples its tokens and keeps what its proposals got right."""
        now = time.time()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        failed: list[RequestOutput] = []
        masks = self._fill_masks(batch)
        try:
            logits = self.runner.execute(batch)  # [N, V] for the sequences sampled this step
        except RunnerLostError:
            raise
        except Exception as error:
            batch, failed = self._without_culprits(batch, error)
            if self.scheduler.state_slots is not None:  # recurrent states are not rewritten as KV is: recompute
                self.scheduler.discard_step(batch)
                return failed
            if not batch:
                return failed
            logits = self.runner.execute(batch)
        computed = [(seq, seq.num_computed_tokens, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        scored = [seq.prompt_scored_positions(n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        if any(scored):
            logits = self._score_prompts(logits, batch, scored)
        sampled = self.scheduler.complete_step(batch)
        if not sampled:
            self._step_done(computed, {})
            return failed
        rows = sampled_rows(sampled)  # a sequence's next token's row, then one per token proposed for it
        if masks is not None:
            self._apply_masks(logits, sampled, masks)
        result = self.sampler.sample(logits, rows.params, rows.generators, rows.histories)
        now = time.time()
        kept_tokens: list[tuple[Sequence, list[int], list, int]] = []
        row = 0
        for seq in sampled:
            drafts, width = seq.spec_token_ids, 1 + len(seq.spec_token_ids)
            drawn, logprobs = result.token_ids[row : row + width], result.logprobs[row : row + width]
            row += width
            kept = 1 + accepted_tokens(drafts, drawn)
            if drafts:
                self.speculator.verified(seq, kept - 1)
            seq.spec_token_ids = []
            kept_tokens.append((seq, drawn[:kept], logprobs[:kept], len(drafts)))
        # Before they are appended (a prefill worker's request ends, and its KV leaves, as its token is): an MTP
        # head's KV of the step's positions then goes with the prompt's.
        self._step_done(computed, {seq: tokens for seq, tokens, _, _ in kept_tokens})
        outputs = failed
        for seq, tokens, logprobs, proposed in kept_tokens:
            outputs.append(self._append(seq, tokens, logprobs, now, proposed))
        return outputs

    def _step_done(self, computed: list[tuple[Sequence, int, int]], new_tokens: dict[Sequence, list[int]]) -> None:
        """Tells the proposer which rows the step computed from where, and what it kept (Proposer.step_done)."""
        if self.speculator is not None:
            self.speculator.step_done(TargetStep(computed, self.runner.hidden_states, new_tokens))

    def _may_speculate(self, seq: Sequence) -> bool:
        """Guided requests (their masks follow one token at a time), budgeted thinking not yet closed (its closing
        tokens may be forced) and prefill workers' (they stop after one) do not speculate."""
        state = self._requests.get(seq.request_id)
        thinking = state.thinking if state is not None else None
        return (
            state is not None and state.matcher is None and not state.prefill_only
            and (thinking is None or thinking.done)
        )  # fmt: skip

    @staticmethod
    def _score_prompts(logits: torch.Tensor, batch: ScheduledBatch, scored: list[range]) -> torch.Tensor:
        """Scores the prompt tokens of the rows the runner put before each sequence's sampled row (`scored`: their
        positions); returns the sampled rows' logits alone."""
        sampled_rows: list[int] = []
        row = 0
        for seq, n, positions in zip(batch.seqs, batch.num_new_tokens, scored):
            targets = torch.tensor([seq.token_ids[p + 1] for p in positions], device=logits.device)
            for start in range(0, len(positions), SCORED_ROWS_AT_ONCE):
                rows = slice(row + start, row + min(start + SCORED_ROWS_AT_ONCE, len(positions)))
                part = targets[start : start + SCORED_ROWS_AT_ONCE]
                top_n = [seq.params.prompt_logprobs] * len(part)
                seq.prompt_logprobs += token_logprobs(logits[rows], part, top_n, ranked=True)
            row += len(positions)
            width = seq.num_sampled_rows(n)
            sampled_rows.extend(range(row, row + width))
            row += width
        return logits[sampled_rows]

    def _fill_masks(self, batch: ScheduledBatch) -> Future[dict[str, torch.Tensor]] | None:
        """Starts filling, in a thread while the model runs, the allowed-token masks of the guided requests this
        step samples (request id -> its mask); None when it samples none."""
        guided = [
            (seq.request_id, masker)
            for seq, n in zip(batch.seqs, batch.num_new_tokens)
            if seq.num_sampled_rows(n)
            and (state := self._requests.get(seq.request_id)) is not None
            and (masker := state.matcher or (state.thinking if state.thinking and state.thinking.forcing else None))
        ]
        if not guided:
            return None
        if self._mask_filler is None:
            self._mask_filler = ThreadPoolExecutor(1, thread_name_prefix="sagellm-guided-masks")
        vocab = self.model.config.vocab_size

        def fill() -> dict[str, torch.Tensor]:
            masks = new_masks(len(guided), vocab)
            for row, (_, matcher) in enumerate(guided):
                matcher.fill(masks, row)
            return {request_id: masks[row] for row, (request_id, _) in enumerate(guided)}

        return self._mask_filler.submit(fill)

    @staticmethod
    def _apply_masks(logits: torch.Tensor, sampled: list[Sequence], masks: Future[dict[str, torch.Tensor]]) -> None:
        """Masks each guided sequence's row (a guided sequence never speculates: one row each; the rows of the
        others' proposals are counted past)."""
        by_request = masks.result()
        starts = [0]
        for seq in sampled:
            starts.append(starts[-1] + 1 + len(seq.spec_token_ids))
        guided = [i for i, seq in enumerate(sampled) if seq.request_id in by_request]
        rows = [starts[i] for i in guided]
        if rows:
            stacked = torch.stack([by_request[sampled[i].request_id] for i in guided])
            with torch.inference_mode():
                mask_logits(logits, stacked, rows)

    def _without_culprits(self, batch: ScheduledBatch, error: Exception) -> tuple[ScheduledBatch, list[RequestOutput]]:
        """After a failed step: runs each sequence's part alone (the same KV written again, nothing sampled) to find
        the ones that fail by themselves, ends those with the error, and returns the batch without them. A step that
        fails only together is not one request's doing (memory, a bug): it raises, and the caller fails them all."""
        culprits = [
            seq
            for seq, n in zip(batch.seqs, batch.num_new_tokens)
            if len(batch.seqs) == 1 or not self._runs_alone(seq, n)
        ]
        if not culprits:
            raise error
        log.error("step_failed_for", request_ids=[s.request_id for s in culprits], error=repr(error))
        outputs = [self._fail(seq, f"{type(error).__name__}: {error}") for seq in culprits]
        keep = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if s not in culprits]
        rest = ScheduledBatch([s for s, _ in keep], [n for _, n in keep], batch.preempted)
        return rest, outputs

    def _runs_alone(self, seq: Sequence, num_new_tokens: int) -> bool:
        try:
            self.runner.execute(ScheduledBatch([seq], [num_new_tokens]))
        except Exception:
            return False
        return True

    def _fail(self, seq: Sequence, message: str, code: str = "internal") -> RequestOutput:
        """Ends a request whose own data made a step fail (`code` "invalid_request": the request's own constraints
        left no token to choose); its blocks are freed, no other request is touched."""
        state = self._requests.pop(seq.request_id)
        self._finish(seq, "error")
        output = self._output(state, "", [], None, time.time())
        output.error, output.error_code = message, code
        return output

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list, now: float, proposed: int = 0) -> RequestOutput:
        """Appends a step's tokens to `seq` (its drawn token, or its accepted proposals and the token after them) up
        to the first that ends it; one output carries them all. `proposed`: how many tokens the step verified."""
        state = self._requests[seq.request_id]
        params, detok = seq.params, state.detokenizer
        finish, stop_reason, delta, appended = None, None, "", 0
        for token, logprob in zip(tokens, logprobs):
            if state.matcher is not None and not state.matcher.accept(token):  # drawn from a row with no token left
                if not state.matcher.may_end:
                    return self._fail(seq, state.matcher.dead_end(params), code="invalid_request")
                finish = "stop"  # the output meets the constraint; the request's restrictions ruled its end out
                break
            seq.append_token(token)
            appended += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if state.logprobs is not None:
                state.logprobs.append(logprob)
            if not params.ignore_eos and token in self.eos_token_ids:
                finish = "stop"
            elif token in params.stop_token_ids:
                finish, stop_reason = "stop", token
            piece = "" if finish else detok.add([token])
            delta += piece
            if state.thinking is not None:
                state.thinking.accept(token, piece)
            if finish is None and detok.stop_string is not None:
                finish, stop_reason = "stop", detok.stop_string
            if finish is None and state.matcher is not None and state.matcher.terminated:
                finish = "stop"  # the grammar takes nothing more: its last token is the output's last
            if finish is None and (
                (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
                or seq.num_tokens >= self.max_model_len
            ):
                finish = "length"
            if finish is not None:
                break
        verified = finish is None and (appended > 1 or proposed)
        if verified and self.scheduler.accept_proposed(seq, appended - 1, proposed):  # recurrent states go back
            self.runner.copy_states(self.scheduler.state_slots.rollback_slot(seq.state_slot), seq.state_slot)
        kv = states = None
        if state.prefill_only and (finish is None or state.export_kv):
            finish = finish or "prefilled"
            slots, window_slots = self._kv_slots(seq, 0, seq.num_prompt_tokens)
            c, head = self.model.config, self._head_kv
            shape = (c.num_kv_layers + bool(head), 2, seq.num_prompt_tokens, *c.kv_row_shape)
            out = self.kv_buffer(shape, torch.float32) if self.kv_buffer else None
            if head is None:
                kv = self.runner.read_kv(slots, out, window_slots)  # [num_layers, 2, prompt_len, Hk, D]
            else:  # the MTP head's layer after the model's
                kv = out if out is not None else torch.empty(shape)
                self.runner.read_kv(slots, kv[: c.num_kv_layers], window_slots)
                head.read_kv(slots, kv[c.num_kv_layers :])
            states = self.runner.read_states(seq.state_slot) if self.scheduler.state_slots is not None else None
        if finish is not None:
            self._finish(seq, finish)
            delta += detok.flush()
            del self._requests[seq.request_id]
        output = self._output(state, delta, tokens[:appended], stop_reason, now)
        output.kv, output.states = kv, states
        return output

    def _output(self, state: _RequestState, delta: str, new_ids: list[int], stop_reason, now: float):
        seq, m = state.seq, state.metrics
        m.first_scheduled_time, m.first_token_time = seq.first_scheduled_time, seq.first_token_time
        m.num_output_tokens, m.num_cached_tokens = seq.num_output_tokens, seq.num_cached_tokens
        m.num_preemptions = seq.num_preemptions
        if seq.is_finished:
            m.finished_time = now
        completion = CompletionOutput(
            index=0,
            text=state.detokenizer.text,
            token_ids=seq.output_token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=stop_reason,
            logprobs=state.logprobs,
            text_delta=delta,
            token_ids_delta=new_ids,
        )
        return RequestOutput(
            seq.request_id,
            state.prompt,
            seq.prompt_token_ids,
            [completion],
            seq.is_finished,
            m,
            prompt_logprobs=seq.prompt_logprobs,
        )


def _salted(cache_salt: str | None, adapter: LoraAdapter | None) -> str | None:
    """A request's cache salt with its adapter's name and directory: an adapter's KV of a prompt is not the base
    model's, nor another adapter's (one loaded anew under the same name included), so prefix blocks are shared only
    within one adapter."""
    if adapter is None:
        return cache_salt
    return f"{cache_salt or ''}\x00lora:{adapter.name}:{adapter.path}"


def _prompt_computed(seq: Sequence) -> bool:
    """Whether `seq`'s prompt KV is computed (so cached for requests sharing it), or never will be by it."""
    return seq.is_finished or seq.num_computed_tokens >= seq.num_prompt_tokens
