"""A draft model as the proposer (vLLM's `{"model": DRAFT, "num_speculative_tokens": k}`): a smaller model with the
target's tokenizer, run by our own model runner with its own paged KV cache, guesses k tokens greedily.

Each target sequence has a shadow sequence here: the same tokens, its own blocks in the draft's cache and its own
count of tokens whose draft KV is computed. A round catches every shadow up on the tokens its sequence gained since
the last round (the bonus token, or a whole prompt the first time: one chunked step for all of them), then decodes
k - 1 more steps for all at once. When the target keeps only a prefix of the guesses, the shadow's computed count
falls back to what both agree on; the KV past it is overwritten by the next round. A sequence that stops decoding
(finished, preempted, handed over) loses its shadow and blocks; a shadow that does not fit the draft's cache simply
proposes nothing.

A draft with recurrent layers (Qwen3.5) gives each shadow a state slot, and a rollback slot that keeps its states
once caught up: its guesses advance the states past what the target may keep, so each round starts from there again,
its computed count back at the catch-up, and computes what the target kept of the guesses anew."""

from __future__ import annotations

from typing import Any

import torch

from sagellm.common.errors import FieldError
from sagellm.common.memory import drop_mapped_pages, return_freed_memory
from sagellm.runtime.engine.block_manager import BlockManager
from sagellm.runtime.engine.runner_over_model import runner_over
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.config import FIELD, SpeculativeConfig
from sagellm.runtime.engine.speculative.proposers import PROPOSERS, Proposer, ProposerContext
from sagellm.runtime.engine.state_slots import StateSlots
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.model_cache import resolve_model

GREEDY = SamplingParams(temperature=0)


@PROPOSERS.register
class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        super().__init__(config, context)
        loaded = load_model(resolve_model(config.model))
        _check_tokenizer(loaded.tokenizer, context.tokenizer, config.model)
        self.vocab_size = context.vocab_size
        # A draft with recurrent layers: a seat per shadow, each with its rollback slot.
        seats = context.max_num_seqs if loaded.config.num_linear_layers else 0
        self.slots = StateSlots(seats, rollbacks=True) if seats else None
        num_state_slots = self.slots.num_slots if self.slots else 0
        self.runner = runner_over(loaded, context.backend, context.cache, num_state_slots=num_state_slots)
        self._caught_up: dict[Sequence, int] = {}  # a shadow -> its computed count when its states were kept
        loaded.weights, loaded.quantized = {}, {}
        return_freed_memory()
        drop_mapped_pages(loaded.mapped)
        self.blocks = BlockManager(context.cache.num_blocks, context.cache.block_size, enable_prefix_caching=False)
        self._shadows: dict[Sequence, Sequence] = {}  # a target sequence -> its shadow here
        self._synced: dict[Sequence, int] = {}  # ... -> how many of its tokens the shadow had from it last round

    def propose_batch(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        work = [(self._shadow(seq), k) for seq, k in requests]
        work = [(shadow, k) for shadow, k in work if self._fits(shadow, k)]
        guesses: dict[Sequence, list[int]] = {shadow: [] for shadow, _ in work}
        # The first step catches each shadow up (a decode where only the last token is new: those go first, as the
        # runner takes them); each later one decodes the last guess of those wanting more.
        work.sort(key=lambda item: item[0].num_tokens - item[0].num_computed_tokens != 1)
        step = 0
        while work:
            batch = ScheduledBatch([s for s, _ in work], [s.num_tokens - s.num_computed_tokens for s, _ in work])
            tokens = self._greedy(self.runner.execute(batch))
            for (shadow, _), token, n in zip(work, tokens, batch.num_new_tokens):
                shadow.num_computed_tokens += n
                if step == 0 and self.slots:  # caught up: its states kept, for the next round to start from
                    self.runner.copy_states(shadow.state_slot, self.slots.rollback_slot(shadow.state_slot))
                    self._caught_up[shadow] = shadow.num_computed_tokens
                shadow.append_token(token)
                guesses[shadow].append(token)
            step += 1
            work = [(shadow, k) for shadow, k in work if step < k]
        return [guesses.get(self._shadows[seq], []) for seq, _ in requests]

    def _shadow(self, seq: Sequence) -> Sequence:
        """`seq`'s shadow: its tokens now the target's, its computed count what the two agree on (the target only
        ever appends, so only the shadow's guesses since the last round can differ)."""
        shadow = self._shadows.get(seq)
        if shadow is None:
            shadow = self._shadows[seq] = Sequence(seq.request_id, list(seq.token_ids), GREEDY)
            self._synced[seq] = seq.num_tokens
            return shadow
        mine, theirs = shadow.token_ids, seq.token_ids
        agreed = min(self._synced[seq], shadow.num_computed_tokens)
        limit = min(len(mine), len(theirs), shadow.num_computed_tokens)
        while agreed < limit and mine[agreed] == theirs[agreed]:
            agreed += 1
        if shadow in self._caught_up:  # recurrent states: back to those kept at the last catch-up
            self.runner.copy_states(self.slots.rollback_slot(shadow.state_slot), shadow.state_slot)
            agreed = min(agreed, self._caught_up.pop(shadow))
        shadow.token_ids = list(theirs)
        shadow.num_computed_tokens = min(agreed, len(theirs) - 1)
        self._synced[seq] = seq.num_tokens
        return shadow

    def _fits(self, shadow: Sequence, k: int) -> bool:
        """Blocks for the shadow's catch-up and its k - 1 guesses after it (the last guess needs no KV), and a seat
        for a draft with recurrent layers."""
        if self.slots and shadow.state_slot < 0:
            if not self.slots.can_seat():
                return False
            self.slots.seat(shadow)
        return self.blocks.allocate(shadow, shadow.num_tokens - shadow.num_computed_tokens + k - 1)

    def _greedy(self, logits: torch.Tensor) -> list[int]:
        return logits[:, : self.vocab_size].argmax(dim=-1).tolist()

    def keep_only(self, running: list[Sequence]) -> None:
        kept = set(running)
        for seq in [s for s in self._shadows if s not in kept or s.is_finished]:
            shadow = self._shadows.pop(seq)
            self.blocks.free(shadow)
            del self._synced[seq]
            self._caught_up.pop(shadow, None)
            if self.slots:
                self.slots.unseat(shadow)

    def close(self) -> None:
        self.runner.close()


def _check_tokenizer(draft: Any, target: Any, name: str | None) -> None:
    """A draft must speak the target's tokens: the same vocabulary, token for token."""
    if draft is None:
        raise FieldError(FIELD, f"{FIELD}: the draft model {name} has no tokenizer; it needs the target's")
    if draft.get_vocab() != target.get_vocab():
        raise FieldError(FIELD, f"{FIELD}: the draft model {name}'s tokenizer is not the target model's "
                                f"({len(draft.get_vocab())} tokens against {len(target.get_vocab())}, or other "
                                "ids); a draft must use the target's vocabulary")  # fmt: skip
