"""The engine: requests in, token deltas out, one `step()` at a time.

    step = schedule -> masks -> execute -> sample -> update

as vLLM v1's `EngineCore.step`: the scheduler picks the step's tokens, the guided requests' masks are filled in a
thread while the runner executes the model, the sampler draws, and the output processor appends, detokenizes and
stops. Each job is a module of its own: the parts are built by engine_builder.py, a request becomes engine state in
request_intake.py, waits in the scheduler's one line until its admission gates let it start (admission_gates.py), has
its masks filled by guided_masks.py and its tokens made into outputs by output_processor.py; this file is the loop
that joins them.

It knows nothing of sockets or event loops; the offline `LLM`, the prefill/decode operators and the servers all
drive it through `add_request` / `step` / `abort_request`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from sagellm.common.errors import InvalidInput
from sagellm.common.memory import return_freed_memory
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.engine_builder import build_engine
from sagellm.runtime.engine.guided_masks import GuidedMasks, Masks
from sagellm.runtime.engine.kv_handover import KvBuffer, KvHandOver
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.engine.model_runner import ModelRunner, RunnerLostError
from sagellm.runtime.engine.output_processor import Computed, OutputProcessor
from sagellm.runtime.engine.outputs import EngineStats, RequestOutput
from sagellm.runtime.engine.peer_prefix import PeerPrefix
from sagellm.runtime.engine.prompt_logprobs import score_prompts
from sagellm.runtime.engine.request_intake import RequestIntake
from sagellm.runtime.engine.request_state import RequestState
from sagellm.runtime.engine.sampler import Sampler, SamplerOutput
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.speculator import StepTimer
from sagellm.runtime.engine.speculative.verify import SpecDecodeStats, sampled_rows
from sagellm.runtime.models.loaded import LoadedModel

log = structlog.get_logger("sagellm.engine")
FLUSH_TIMEOUT_S = 30.0  # the longest a sleep, unload or exit waits for the tiers' disk writes


@dataclass
class _Executed:
    """A step's run of the model (without the requests that failed it alone): each (sequence, first position, rows)
    it computed, the logits of the rows it samples, and the sequences those rows sample (`Scheduler.complete_step`)."""

    computed: Computed
    logits: torch.Tensor  # [N, V]
    sampled: list[Sequence]


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
        parts = build_engine(config, loaded, make_runner)
        self.config, self.model, self.backend, self.runner = config, parts.model, parts.backend, parts.runner
        self.tokenizer, self.sampling_defaults = parts.model.tokenizer, parts.sampling_defaults
        self.max_model_len, self.scheduler = parts.max_model_len, parts.scheduler
        self.lora, self.speculator = parts.lora, parts.speculator
        self.kv_events = parts.kv_events
        self.eos_token_ids = set(self.model.config.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids)
        self.last_step_prompt_tokens = 0
        self.last_step_prefills: list[tuple[str, int]] = []  # (request id, prompt tokens) computed by the last step
        self._requests: dict[str, RequestState] = {}  # by id: the intake enters them, the output processor ends them
        vocab = self.model.config.vocab_size
        self._intake = RequestIntake(self._requests, self.tokenizer, vocab, self.eos_token_ids, self.max_model_len,
                                     self.lora, parts.media.prompts if parts.media else None)  # fmt: skip
        self._masks = GuidedMasks(self._requests, vocab)
        self._kv_handover = KvHandOver(self.runner, self.scheduler, self.model.config, parts.head_kv)
        self._outputs = OutputProcessor(
            self._requests,
            self.scheduler,
            self.runner,
            speculator=self.speculator,
            kv_handover=self._kv_handover,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )

    @property
    def kv_buffer(self) -> KvBuffer | None:
        """Where a prefill's KV is gathered for its hand-over: shared memory when it leaves the process (set by the
        prefill operator), so sending it copies nothing more; None: a new tensor."""
        return self._kv_handover.buffer

    @kv_buffer.setter
    def kv_buffer(self, buffer: KvBuffer | None) -> None:
        self._kv_handover.buffer = buffer

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
        multi_modal_data: Mapping[str, Any] | None = None,
        peer_prefix: PeerPrefix | None = None,
    ) -> None:
        """Queues a request. With `prefill_only` (a prefill worker), it ends after its first token with finish reason
        "prefilled" and its prompt's KV in `RequestOutput.kv`, unless that token already finished it. `export_kv`
        (prefill for another server): ends after its first token too, its KV out whatever that token's finish
        reason, since the server that decodes it applies the request's own limits.
        `resumed_tokens`: the prompt ends with that many tokens another engine generated for this request (a resume):
        the text continues from them as that engine's would have. `group`: requests of one group share their
        prompt (the `n` choices of one request, each added with `SamplingParams.choice`): its blocks are computed
        and held once. `cache_salt`: its prompt shares cached blocks only with prompts of the same salt.
        `lora_request`: the LoRA adapter it is generated with (an engine with enable_lora). `multi_modal_data`
        (vLLM's): {"image": images}, one per image placeholder of the prompt (a model with a vision encoder).
        `peer_prefix`: another instance holds more of the prompt's prefix (the router's word): an engine with tiers
        under its prefix cache fetches it from there."""
        if params.n != 1:
            raise InvalidInput(f"n={params.n}: add each choice on its own (SamplingParams.choice) in one group")
        state = self._intake.new(request_id, prompt, params, priority, resumed_tokens, cache_salt=cache_salt,
                                 lora_request=lora_request, multi_modal_data=multi_modal_data)  # fmt: skip
        state.prefill_only, state.export_kv = prefill_only or export_kv, export_kv
        state.seq.group, state.seq.peer_prefix = group, peer_prefix
        self.scheduler.add(state.seq)

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
        multi_modal_data: Mapping[str, Any] | None = None,
    ) -> RequestOutput:
        """Continues a request a prefill worker started: its prompt's KV `kv` [num_layers, 2, prompt_len, Hk, D]
        goes into this engine's own cache (blocks already cached here are shared, not written), with a model with
        recurrent layers its `states` after the prompt into a state slot when it is admitted, and `first_token` is
        appended as if sampled here. Returns the first token's output. Without room for the blocks, or without the
        states such a model needs, the prompt is recomputed instead: slower, same tokens. `multi_modal_data`: the
        prompt's images, as the prefill worker had them: their placeholders expand alike, and the blocks they fill
        are cached under the images' keys, never shared with another image's (or a text's of the same ids)."""
        state = self._intake.new(request_id, prompt_token_ids, params, priority, resumed_tokens, scored=True,
                                 cache_salt=cache_salt, lora_request=lora_request,
                                 multi_modal_data=multi_modal_data)  # fmt: skip
        seq, n = state.seq, state.seq.num_prompt_tokens
        if kv.shape[2] != n:
            del self._requests[request_id]
            raise ValueError(f"KV covers {kv.shape[2]} tokens, the prompt has {n}")
        if states is not None and states.numel() != self.runner.states_size:
            del self._requests[request_id]
            raise ValueError(f"recurrent states of {states.numel()} values; this model's are {self.runner.states_size}")
        seq.imported_states = states if self.scheduler.state_slots is not None else None
        if not self.scheduler.import_prompt(seq, self._kv_handover.writer(seq, kv)):
            why = "no_states" if self.scheduler.state_slots is not None and states is None else "no_room"
            log.warning("kv_import_recomputed", request_id=request_id, prompt_tokens=n, why=why)
            seq.imported_states = None
        seq.first_scheduled_time = time.time()
        output = self._outputs.append(seq, [first_token], [None], seq.first_scheduled_time)
        if not seq.is_finished:
            self.scheduler.add(seq)
        return output

    def abort_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None and not state.seq.is_finished:
            self.scheduler.finish(state.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """The engine's load now, for whoever places requests on engines."""
        waiting, running = self.scheduler.waiting, self.scheduler.running
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
            num_threads=torch.get_num_threads(),
            kv_offload=self.scheduler.tiers.stats() if self.scheduler.tiers is not None else None,
        )

    def close(self) -> None:
        """Stops what the engine started besides itself (a tensor parallel group's ranks, the mask thread); the tiers
        under the prefix cache keep its cached blocks on disk first, for the next start."""
        if self.scheduler.tiers is not None:
            self.scheduler.tiers.close(FLUSH_TIMEOUT_S)
            self.scheduler.tiers = None
        if self.kv_events is not None:
            self.kv_events.close()
        self.runner.close()
        if self.speculator is not None:
            self.speculator.close()
        self._masks.close()

    def release_kv_cache(self) -> bool:
        """Gives the KV cache's memory back while the engine holds no request (vLLM's sleep level 1), keeping the
        weights: its prefix cache is forgotten (the blocks read as zeros after). False, and nothing changed, where
        only a whole new engine frees it: a parallel group, a speculator with caches of its own, another device."""
        if self.has_unfinished_requests():
            raise InvalidInput("the engine's KV cache is freed only while it holds no request")
        if self.config.world_size > 1 or self.speculator is not None:
            return False
        if self.scheduler.tiers is not None:  # its blocks go down to the tiers first: found again after waking
            self.scheduler.tiers.flush(FLUSH_TIMEOUT_S)
        if not self.runner.release_kv_cache():
            return False
        self.scheduler.block_manager.reset_prefix_cache()
        if self.kv_events is not None:
            self.kv_events.flush()
        return_freed_memory()
        return True

    def restore_kv_cache(self) -> None:
        """Serves again after `release_kv_cache` (its pages are mapped as it writes)."""
        self.runner.restore_kv_cache()

    # -- the loop -----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> masks -> execute -> sample -> update: a token more for each sequence the step samples (or the
        proposals its draws confirm, and the draw after them)."""
        batch, timer = self._schedule()
        if not batch:
            return []
        masks = self._masks.fill(batch)  # filled in a thread while the model runs
        executed, outputs = self._execute(batch)  # `outputs`: the requests whose own data failed the model, ended
        if executed is not None:
            tokens = self._sample(executed.logits, executed.sampled, masks)
            outputs += self._outputs.update(executed.computed, executed.sampled, tokens)
        self._speculation_done(timer)
        return outputs

    def _schedule(self) -> tuple[ScheduledBatch, StepTimer]:
        """The step's batch: the speculator proposes tokens to the running sequences, and the scheduler picks the
        step's tokens; and the step's timer, started before the proposals, for the speculator's budget."""
        started = time.perf_counter()
        if self.kv_events is not None:  # what the last step cached, evicted, stored and loaded: one batch
            self.kv_events.flush()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self._may_speculate)
        batch = self.scheduler.schedule()
        # Prompt tokens computed this step, by request (a traced request's prefill chunks), and in all: the operators'
        # prefill rate, which predicts a request's wait for its first token (decode steps, and the tokens proposed to
        # them, would say nothing of it). A one-token prompt's entry has a decode's shape: its uncomputed prompt
        # says it is not one.
        decodes = batch.num_decodes
        self.last_step_prefills = [
            (seq.request_id, n)
            for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
            if i >= decodes or seq.num_computed_tokens < seq.num_prompt_tokens
        ]
        self.last_step_prompt_tokens = sum(n for _, n in self.last_step_prefills)
        return batch, StepTimer.of(batch, started)

    def _execute(self, batch: ScheduledBatch) -> tuple[_Executed | None, list[RequestOutput]]:
        """Runs the model on `batch`, scoring its prompt rows for prompt logprobs, and moves the sequences it computed
        on (`Scheduler.complete_step`). Requests whose own data fails the model end alone (their outputs returned) and
        the rest run again; None when nothing is left to sample (a model with recurrent layers then recomputes the
        rest)."""
        failed: list[RequestOutput] = []
        try:
            logits = self.runner.execute(batch)  # [N, V] for the sequences sampled this step
        except RunnerLostError:
            raise
        except Exception as error:
            batch, failed = self._without_culprits(batch, error)
            if self.scheduler.state_slots is not None:  # recurrent states are not rewritten as KV is: recompute
                self.scheduler.discard_step(batch)
                return None, failed
            if not batch:
                return None, failed
            logits = self.runner.execute(batch)
        computed = [(seq, seq.num_computed_tokens, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        logits = score_prompts(logits, batch)  # (before the sequences move on: it reads their positions)
        return _Executed(computed, logits, self.scheduler.complete_step(batch)), failed

    def _sample(self, logits: torch.Tensor, sampled: list[Sequence], masks: Masks | None) -> SamplerOutput | None:
        """Draws the `sampled` sequences' rows, each guided one's mask applied first; None when there are none."""
        if not sampled:
            return None
        rows = sampled_rows(sampled)  # a sequence's next token's row, then one per token proposed for it
        if masks is not None:
            self._masks.apply(logits, sampled, masks)
        return self.sampler.sample(logits, rows.params, rows.generators, rows.histories)

    def _speculation_done(self, timer: StepTimer) -> None:
        """Tells the speculator which sequences still run and how long the step took (`Speculator.step_ended`)."""
        if self.speculator is not None:
            self.speculator.step_ended(timer, self.scheduler.running)

    def _may_speculate(self, seq: Sequence) -> bool:
        state = self._requests.get(seq.request_id)
        return state is not None and state.may_speculate

    def _without_culprits(self, batch: ScheduledBatch, error: Exception) -> tuple[ScheduledBatch, list[RequestOutput]]:
        """After a failed step: runs each sequence's part alone (the same KV written again, nothing sampled) to find
        the ones that fail by themselves, ends those with the error, and returns the batch without them. A step that
        fails only together is not one request's doing (memory, a bug): it raises, and the caller fails them all."""
        culprits = [
            seq
            for seq, n in zip(batch.seqs, batch.num_new_tokens)
            if len(batch.seqs) == 1 or not _runs_alone(self.runner, seq, n)
        ]
        if not culprits:
            raise error
        log.error("step_failed_for", request_ids=[s.request_id for s in culprits], error=repr(error))
        outputs = [self._outputs.fail(seq, f"{type(error).__name__}: {error}") for seq in culprits]
        keep = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if s not in culprits]
        rest = ScheduledBatch([s for s, _ in keep], [n for _, n in keep], batch.preempted)
        return rest, outputs


def _runs_alone(runner: ModelRunner, seq: Sequence, num_new_tokens: int) -> bool:
    try:
        runner.execute(ScheduledBatch([seq], [num_new_tokens]))
    except Exception:
        return False
    return True
