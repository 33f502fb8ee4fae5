"""The model's own multi-token prediction head as the proposer (vLLM's `{"method": "mtp", "num_speculative_tokens":
k}`): Qwen3.5's and Qwen3-Next's `mtp.` layer (runtime/models/mtp_head.py), run by a runner of its own graph over the
target's block tables.

The head's KV at position p is computed from the token at p + 1 and the target's final hidden state at p, so it runs
one step behind the target, as vLLM's does: after each target step (`step_done`) it computes the positions that step
computed and kept, for every sequence in it (a prompt's chunks too, so the blocks the prefix cache later shares hold
the head's KV as well), each with the token after it; where that reaches a sequence's last token, the row's logits
give its first guess. The guesses after it (k > 1) are decode steps of the head alone at the next round, each reading
the head's own last hidden state in place of the target's, as far as the sequence's blocks reach (the target
allocates a step's blocks when it schedules it); their KV, past what the target computed, is written over when the
head catches up.

Its cache is a tensor of its own, one layer with the target's number of blocks, so a sequence's block table indexes
both. A prefill worker's hand-over carries the head's KV of the prompt after the model's layers (`read_kv`, computed
before the request ends with its first token), which a decode worker with the head stores (`write_kv`). What the
head cannot see it does not guess for: a prompt whose KV came without the head's (a prefill worker without one), a
sequence whose head fell behind (a step run again after a failure). A prefix hit's last position
holds the head's KV computed with the token that followed it in the prompt that cached it: where the new prompt goes
on differently, that one position of the head's attention is off, which costs guesses, never tokens (the target
verifies every one)."""

from __future__ import annotations

import weakref

import torch

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.model_runner import ModelRunner
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.config import FIELD, SpeculativeConfig
from sagellm.runtime.engine.speculative.proposers import PROPOSERS, Proposer, ProposerContext, TargetStep
from sagellm.runtime.models.decoder_graph import build_mtp_graph
from sagellm.runtime.models.mtp_head import head_config

GREEDY = SamplingParams(temperature=0)
BEHIND = -1  # a sequence the head has no KV for: it gets no guesses


@PROPOSERS.register
class MtpProposer(Proposer):
    name = "mtp"

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        super().__init__(config, context)
        if context.head is None:
            raise FieldError(FIELD, f"{FIELD}: method mtp needs the model's multi-token prediction head")
        self.vocab_size = context.vocab_size
        self.block_size = context.cache.block_size
        head = head_config(context.head.config)
        self.runner = ModelRunner(
            head,
            context.head.weights,
            context.backend,
            num_blocks=context.cache.num_blocks,
            block_size=context.cache.block_size,
            max_model_len=context.cache.max_model_len,
            max_step_tokens=context.cache.max_step_tokens,
            graph=build_mtp_graph(head),
            packed=context.head.packed,
        )
        self._next: dict[Sequence, int] = {}  # a sequence -> the first position the head has no KV for (or BEHIND)
        # ... -> (its length then, the head's first guess, the head's hidden state it was made from)
        self._first: dict[Sequence, tuple[int, int, torch.Tensor]] = {}
        self._imported_with_kv: weakref.WeakSet[Sequence] = weakref.WeakSet()  # prompts whose head KV came along

    def step_done(self, step: TargetStep) -> None:
        work: list[tuple[Sequence, list[int], int, int, torch.Tensor]] = []  # (sequence, its tokens, from, to, rows)
        row = 0
        for seq, start, n in step.computed:
            rows, row = slice(row, row + n), row + n
            if step.hidden_states is None or seq.is_finished:
                continue
            seen = not _imported(seq, start) or seq in self._imported_with_kv
            head = self._next.setdefault(seq, start if seen else BEHIND)
            if head == BEHIND or head < start:  # positions before this step's the head never saw
                self._next[seq] = BEHIND
                self._first.pop(seq, None)
                continue
            tokens = seq.token_ids + step.new_tokens.get(seq, [])
            stop = min(start + n, len(tokens) - 1)  # a position's row needs the token after it
            if stop > start:
                work.append((seq, tokens, start, stop, step.hidden_states[rows][: stop - start]))
        if not work:
            return
        work.sort(key=lambda item: item[3] - item[2] != 1)  # decodes first, as the runner takes them
        shadows = [self._shadow(seq, tokens[1 : stop + 1], start) for seq, tokens, start, stop, _ in work]
        batch = ScheduledBatch(shadows, [stop - start for _, _, start, stop, _ in work])
        out = self.runner.forward(self.runner.step_inputs(batch), {"hidden": torch.cat([h for *_, h in work])})
        guesses = self._greedy(out["logits"])
        for (seq, tokens, _, stop, _), guess, hidden in zip(work, guesses, out["hidden_states"]):
            self._next[seq] = stop
            if stop == len(tokens) - 1:
                self._first[seq] = (len(tokens), guess, hidden)
            else:
                self._first.pop(seq, None)

    def read_kv(self, slots: torch.Tensor, out: torch.Tensor) -> None:
        """The head's K and V at `slots` into `out` [1, 2, n, Hk, D]: a prompt's, for a decode worker."""
        self.runner.read_kv(slots, out)

    def write_kv(self, seq: Sequence, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Stores a prefill worker's head KV of `seq`'s prompt (`read_kv`'s) at `slots`: the head guesses for it."""
        self.runner.write_kv(slots, kv)
        self._imported_with_kv.add(seq)

    def propose_batch(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        guesses: dict[Sequence, list[int]] = {}
        hidden: dict[Sequence, torch.Tensor] = {}
        for seq, _ in requests:
            first = self._first.get(seq)
            if first is not None and first[0] == seq.num_tokens:
                guesses[seq], hidden[seq] = [first[1]], first[2]
        wanting = dict(requests)
        while True:  # each further guess: a decode of the head at the position of the guess before it
            more = [seq for seq, made in guesses.items() if len(made) < wanting[seq] and self._has_block(seq, made)]
            if not more:
                break
            shadows = [self._shadow(seq, seq.token_ids[1:] + guesses[seq], seq.num_tokens - 2 + len(guesses[seq]))
                       for seq in more]  # fmt: skip
            batch = ScheduledBatch(shadows, [1] * len(more))
            states = torch.stack([hidden[seq] for seq in more])
            out = self.runner.forward(self.runner.step_inputs(batch), {"hidden": states})
            for seq, guess, state in zip(more, self._greedy(out["logits"]), out["hidden_states"]):
                guesses[seq].append(guess)
                hidden[seq] = state
        return [guesses.get(seq, []) for seq, _ in requests]

    def _has_block(self, seq: Sequence, made: list[int]) -> bool:
        """Whether the position of the last guess (where the head's next row writes its KV) is in `seq`'s blocks."""
        return (seq.num_tokens - 1 + len(made) - 1) // self.block_size < len(seq.block_table)

    @staticmethod
    def _shadow(seq: Sequence, tokens: list[int], computed: int) -> Sequence:
        """The head's view of `seq`: each position's token is the one after it; the target's block table."""
        shadow = Sequence(seq.request_id, tokens, GREEDY)
        shadow.num_computed_tokens, shadow.block_table = computed, seq.block_table
        return shadow

    def _greedy(self, logits: torch.Tensor) -> list[int]:
        return logits[:, : self.vocab_size].argmax(dim=-1).tolist()

    def keep_only(self, running: list[Sequence]) -> None:
        kept = set(running)
        for seq in [s for s in self._next if s not in kept or s.is_finished]:
            del self._next[seq]
            self._first.pop(seq, None)

    def close(self) -> None:
        self.runner.close()


def _imported(seq: Sequence, start: int) -> bool:
    """A prompt whose KV a prefill worker computed: its first step here starts after the whole prompt, which a
    prefix hit never covers (one token is always left to compute)."""
    return start > 0 and seq.num_cached_tokens >= seq.num_prompt_tokens
