"""What follows sampling: a step's sampled tokens made into each request's output.

For each sequence the step sampled: the proposals its draws confirm are kept (speculative decoding), then its tokens
are appended up to the first that ends it (EOS, a stop token or string, its grammar's end, its length), each
detokenized, accepted by its grammar and counted by its thinking budget; a prefill worker's request ends after its
first token with its prompt's KV for the hand-over. A request that ends gives back what it holds (`Scheduler.finish`).
vLLM v1's scheduler does this in `update_from_output`; it is one job, apart from the loop that schedules and runs
steps, so a rule about when a request stops is written here and nowhere else."""

from __future__ import annotations

import time

from sagellm.runtime.engine.kv_handover import KvHandOver
from sagellm.runtime.engine.model_runner import ModelRunner
from sagellm.runtime.engine.outputs import CompletionOutput, RequestOutput
from sagellm.runtime.engine.request_state import RequestState
from sagellm.runtime.engine.sampler import SamplerOutput
from sagellm.runtime.engine.scheduler import Scheduler
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.proposers import TargetStep
from sagellm.runtime.engine.speculative.speculator import Speculator
from sagellm.runtime.engine.speculative.verify import accepted_tokens

Computed = list[tuple[Sequence, int, int]]  # each (sequence, its first position, rows) a step computed, in row order


class OutputProcessor:
    def __init__(
        self,
        requests: dict[str, RequestState],
        scheduler: Scheduler,
        runner: ModelRunner,
        *,
        speculator: Speculator | None,
        kv_handover: KvHandOver,
        eos_token_ids: set[int],
        max_model_len: int,
    ) -> None:
        """`requests`: the engine's table, by request id, whose requests leave it as they end."""
        self._requests, self._scheduler, self._runner = requests, scheduler, runner
        self._speculator, self._kv_handover = speculator, kv_handover
        self._eos_token_ids, self._max_model_len = eos_token_ids, max_model_len

    def update(self, computed: Computed, sampled: list[Sequence], result: SamplerOutput | None) -> list[RequestOutput]:
        """The outputs of a step that computed `computed` and drew `result` for the `sampled` sequences (None: it
        sampled none): each sequence's drawn token, or its proposals its draws confirm and the draw after them."""
        now = time.time()
        kept_tokens: list[tuple[Sequence, list[int], list, int]] = []
        row = 0
        for seq in sampled:
            drafts, width = seq.spec_token_ids, 1 + len(seq.spec_token_ids)
            drawn, logprobs = result.token_ids[row : row + width], result.logprobs[row : row + width]
            row += width
            kept = 1 + accepted_tokens(drafts, drawn)
            if drafts:
                self._speculator.verified(seq, kept - 1)
            seq.spec_token_ids = []
            kept_tokens.append((seq, drawn[:kept], logprobs[:kept], len(drafts)))
        # Before they are appended (a prefill worker's request ends, and its KV leaves, as its token is): an MTP
        # head's KV of the step's positions then goes with the prompt's.
        if self._speculator is not None:  # which rows the step computed from where, and what it kept
            new_tokens = {seq: tokens for seq, tokens, _, _ in kept_tokens}
            self._speculator.step_done(TargetStep(computed, self._runner.hidden_states, new_tokens))
        return [self.append(seq, tokens, logprobs, now, proposed) for seq, tokens, logprobs, proposed in kept_tokens]

    def append(self, seq: Sequence, tokens: list[int], logprobs: list, now: float, proposed: int = 0) -> RequestOutput:
        """Appends a step's tokens to `seq` (its drawn token, or its accepted proposals and the token after them) up
        to the first that ends it; one output carries them all. `proposed`: how many tokens the step verified."""
        state = self._requests[seq.request_id]
        params, detok = seq.params, state.detokenizer
        finish, stop_reason, delta, appended = None, None, "", 0
        for token, logprob in zip(tokens, logprobs):
            if state.matcher is not None and not state.matcher.accept(token):  # drawn from a row with no token left
                if not state.matcher.may_end:
                    return self.fail(seq, state.matcher.dead_end(params), code="invalid_request")
                finish = "stop"  # the output meets the constraint; the request's restrictions ruled its end out
                break
            seq.append_token(token)
            appended += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if state.logprobs is not None:
                state.logprobs.append(logprob)
            if not params.ignore_eos and token in self._eos_token_ids:
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
                or seq.num_tokens >= self._max_model_len
            ):
                finish = "length"
            if finish is not None:
                break
        verified = finish is None and (appended > 1 or proposed)
        if verified:
            self._scheduler.accept_proposed(seq, appended - 1, proposed)
        kv = states = None
        if state.prefill_only and (finish is None or state.export_kv):
            finish = finish or "prefilled"
            kv, states = self._kv_handover.export(seq)
        if finish is not None:
            self._scheduler.finish(seq, finish)
            delta += detok.flush()
            del self._requests[seq.request_id]
        output = _output(state, delta, tokens[:appended], stop_reason, now)
        output.kv, output.states = kv, states
        return output

    def fail(self, seq: Sequence, message: str, code: str = "internal") -> RequestOutput:
        """Ends a request whose own data made a step fail (`code` "invalid_request": the request's own constraints
        left no token to choose); its blocks are freed, no other request is touched."""
        state = self._requests.pop(seq.request_id)
        self._scheduler.finish(seq, "error")
        output = _output(state, "", [], None, time.time())
        output.error, output.error_code = message, code
        return output


def _output(state: RequestState, delta: str, new_ids: list[int], stop_reason, now: float) -> RequestOutput:
    seq, m = state.seq, state.metrics
    m.first_scheduled_time, m.first_token_time = seq.first_scheduled_time, seq.first_token_time
    m.num_output_tokens, m.num_cached_tokens = seq.num_output_tokens, seq.num_cached_tokens
    m.cached_tokens_by_tier = seq.cached_by_tier
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
