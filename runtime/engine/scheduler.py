"""Picks the work of each engine step under one token budget (the vLLM v1 shape).

Running sequences go first: each needs its next token (decode) or the rest of a chunked prefill. Waiting sequences
then fill what is left of the budget, their cached prefix skipped, in the order of the scheduling policy's queue
(`request_queue.py`). When the KV cache cannot grow a running sequence, one is preempted: its blocks are freed and it
is recomputed later (its prefix blocks are likely still cached). Under `fcfs` that is the most recently admitted;
under `priority` the lowest (largest priority value, latest arrival among equals), as in vLLM v1; and a waiting
sequence that has no seat or no blocks preempts running ones that rank below it (as vLLM v0's priority scheduler
did), so a high-priority request never waits for low ones that hold the engine to finish. Requests join and leave
the running batch between steps: continuous batching. Long prompts take a share of each step, and shorter ones
waiting behind them start ahead (`long_prefills.py`, vLLM's `--long-prefill-token-threshold`).

The scheduler owns the block manager (as in nano-vllm): every block a sequence gets or gives back goes through it,
so the engine and the runner never allocate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.admission_gates import AdmissionGate, admission_gates
from sagellm.runtime.engine.block_manager import BlockManager
from sagellm.runtime.engine.long_prefills import MAX_LONG_HOLDS, PrefillShares, ShortArrivals, short_prompt_waits
from sagellm.runtime.engine.lora_slots import LoraSlots
from sagellm.runtime.engine.media_spans import whole_runs_chunk
from sagellm.runtime.engine.request_queue import QUEUES, serving_order
from sagellm.runtime.engine.sequence import Sequence, SequenceStatus
from sagellm.runtime.engine.state_slots import StateSlots, plan_checkpoints
from sagellm.runtime.engine.window_blocks import WindowedBlocks
from sagellm.runtime.engine.yielding import YieldingCredit

if TYPE_CHECKING:
    from sagellm.runtime.engine.kv_tiers.prefix_tiers import PrefixTiers


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # sequences in one batch
    max_num_batched_tokens: int  # token budget of one step (chunked prefill cuts prompts to fit)
    max_model_len: int  # prompt + output tokens of one sequence
    num_blocks: int  # KV cache blocks
    block_size: int  # tokens per block
    # A model whose sliding-window layers keep a cache group of their own: their window and that group's blocks; a
    # model whose every layer slides: the window of its one group.
    window: int = 0
    num_window_blocks: int = 0
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # a key of request_queue.QUEUES: fcfs or priority
    # A model with recurrent layers: the slots of their states, a seat per running sequence (0: no such layers), and
    # the prefix cache's checkpoints of them.
    num_state_slots: int = 0
    num_state_checkpoints: int = 0
    speculative: bool = False  # proposals are verified: a recurrent model's seats get rollback slots
    # vLLM's long-prefill settings (long_prefills.py): the threshold past which a prompt is long and computes
    # `long_prefill_chunk_tokens` a step (0: the threshold's; threshold 0: off, each prompt takes what the budget
    # leaves), the prompt positions a step scores for logprobs (0: the chunk's), the prompts and the long ones
    # prefilled across steps at once, and the context at which a long prompt's chunk has shrunk to half (0: it never
    # does).
    long_prefill_token_threshold: int = 0
    long_prefill_chunk_tokens: int = 0
    long_prefill_scored_tokens: int = 0
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    long_prefill_context_scale: int = 0
    long_prefill_whole_alone: bool = False  # a long prompt alone takes whole steps (the default's; not vLLM's)
    # A model whose pictures attend both ways in a prefill (Gemma 3): no chunk ends inside a picture's run
    # (media_spans.py).
    whole_media_runs: bool = False


@dataclass
class ScheduledBatch:
    """One step's work: `seqs[i]` computes `num_new_tokens[i]` tokens. Decodes come first: single-token entries, and
    entries computing a sequence's next token and the tokens proposed after it (speculative decoding), whose rows
    each attend over the cache up to themselves as a decode does (a model with recurrent layers, `recurrent`,
    verifies proposals as a chunk instead)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # A model with recurrent layers: the slot a sequence's states start from (a prefix hit's checkpoint, or its
    # rollback slot after rejected proposals), and, for a prefill whose chunk crosses a block boundary, (its tokens
    # up to that boundary, the checkpoint slot to fill).
    restores: dict[Sequence, int] = field(default_factory=dict)
    checkpoints: dict[Sequence, tuple[int, int]] = field(default_factory=dict)
    # ... and the states a prefill worker computed after the prompt of a sequence admitted now, for its seat.
    state_writes: dict[Sequence, torch.Tensor] = field(default_factory=dict)
    recurrent: bool = False

    @property
    def num_decodes(self) -> int:
        """The decode entries (before `complete_step`, which clears the proposals)."""
        return sum(1 for seq, n in zip(self.seqs, self.num_new_tokens) if _decodes(seq, n, self.recurrent))

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def samples_every_row(self) -> bool:
        """Whether every row samples a token: a step of decoding rows only, each sequence's next token and its
        proposals (before `complete_step`), which is what speculation's budget weighs."""
        return all(seq.num_sampled_rows(n) == n for seq, n in zip(self.seqs, self.num_new_tokens))

    def __bool__(self) -> bool:
        return bool(self.seqs)


def _decodes(seq: Sequence, n: int, recurrent: bool = False) -> bool:
    """A decode entry: the sequence's next token and the tokens proposed after it, a row each. A model with recurrent
    layers verifies proposals as a chunk instead (rows of one sequence cannot advance its states side by side)."""
    return n == 1 + len(seq.spec_token_ids) and not (recurrent and seq.spec_token_ids)


@dataclass
class _Step:
    """What one `schedule()` has handed out so far. A sequence preempted after it was scheduled gives its tokens
    back to the budget."""

    budget: int
    shares: PrefillShares = field(default_factory=PrefillShares)
    scheduled: dict[Sequence, int] = field(default_factory=dict)  # sequence -> its tokens, in scheduling order
    preempted: list[Sequence] = field(default_factory=list)
    restores: dict[Sequence, int] = field(default_factory=dict)  # admitted on a prefix hit -> its checkpoint slot
    state_writes: dict[Sequence, torch.Tensor] = field(default_factory=dict)  # admitted with imported states

    def take(self, seq: Sequence, n: int, admitted: bool = False) -> None:
        self.shares.took(seq, n, admitted)
        self.scheduled[seq] = n
        self.budget -= n

    def drop(self, seq: Sequence) -> None:
        self.budget += self.scheduled.pop(seq, 0)
        self.preempted.append(seq)


class Scheduler:
    def __init__(self, config: SchedulerConfig, lora: LoraSlots | None = None) -> None:
        """`lora`: the engine's LoRA adapter slots (an engine with enable_lora), which its requests wait for."""
        if config.scheduling_policy not in QUEUES:
            raise InvalidInput(f"scheduling policy {config.scheduling_policy!r}: the policies are {', '.join(QUEUES)}")
        self.config = config
        self.by_priority = config.scheduling_policy == "priority"
        self.block_manager: BlockManager | WindowedBlocks
        if config.num_window_blocks:
            self.block_manager = WindowedBlocks(config.num_blocks, config.num_window_blocks, config.block_size,
                                                config.window, config.enable_prefix_caching)  # fmt: skip
        else:  # one group, which slides when every layer does
            self.block_manager = BlockManager(
                config.num_blocks, config.block_size, config.enable_prefix_caching, window=config.window
            )
        self.state_slots: StateSlots | None = None
        if config.num_state_slots:
            assert config.num_state_slots >= config.max_num_seqs, "a recurrent state slot for each seat of the batch"
            self.state_slots = StateSlots(config.num_state_slots, config.num_state_checkpoints, config.speculative)
        self.gates: list[AdmissionGate] = admission_gates(self.state_slots, lora)
        self.waiting = QUEUES[config.scheduling_policy]()  # every request not running: the one waiting line
        self.running: list[Sequence] = []
        # A recurrent model's sequence whose proposals were rejected -> the slot its next chunk starts from
        self._rollbacks: dict[Sequence, int] = {}
        self._long_holds = 0  # steps in a row that held long prompts' chunks back for short ones
        self.shorts = ShortArrivals(self.config.long_prefill_token_threshold)
        self.yielding = YieldingCredit()  # what a batch job's prompts may compute beside live requests
        self.tiers: PrefixTiers | None = None  # the tiers under the prefix cache (set by the engine's builder)

    def add(self, seq: Sequence) -> None:
        self.shorts.saw(seq)
        self.waiting.add(seq)
        for gate in self.gates:
            gate.joined(seq)

    def may_start(self, seq: Sequence) -> bool:
        """Whether every admission gate lets the waiting `seq` start now (`admission_gates.py`)."""
        return all(gate.ready(seq) for gate in self.gates)

    def import_prompt(self, seq: Sequence, write_kv: Callable[[int], None]) -> bool:
        """Gives a sequence whose prompt KV was computed elsewhere (a prefill worker) the blocks of its whole prompt,
        sharing those of its prefix already cached here; `write_kv(start)` then copies the prompt's KV from token
        `start` on into them. False without room: nothing changes, and the prompt is recomputed when scheduled.
        False too for a model with recurrent layers when their states did not come with the KV
        (`seq.imported_states`)."""
        if self.state_slots is not None and seq.imported_states is None:
            return False
        cached = self.block_manager.find_cached_prefix(seq)
        start = len(cached) * self.block_manager.block_size
        # Its first query is the decode after the prompt: a sliding-window group needs only that window's blocks.
        if not self.block_manager.allocate(seq, seq.num_prompt_tokens - start, cached, seq.num_prompt_tokens):
            return False
        if self.tiers is not None:
            self.tiers.store_evicted()
        write_kv(start)
        seq.num_computed_tokens = seq.num_prompt_tokens  # counted as cached tokens when admitted: none computed here
        self.block_manager.cache_full_blocks(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        seat_free = len(self.running) < self.config.max_num_seqs
        shares = self._shares()
        shares.shorts_first = (
            self._long_holds < MAX_LONG_HOLDS
            and seat_free
            and short_prompt_waits(
                filter(self.may_start, self.waiting), shares.threshold, shares.scored_tokens, shares.yielding_from
            )
        )
        step = _Step(self.config.max_num_batched_tokens, shares)
        index = 0
        while index < len(self.running) and step.budget > 0:
            seq = self.running[index]
            computed = seq.num_computed_tokens
            n = shares.share(seq, computed, min(seq.num_tokens - computed + len(seq.spec_token_ids), step.budget))
            n = self._whole_runs(seq, computed, n, step.budget)
            if n == 0:  # its prompt logprobs wait for the next step's share, or a picture for room
                index += 1
                continue
            del seq.spec_token_ids[max(n - 1, 0) :]  # proposals beyond the budget are not verified this step
            while not self.block_manager.allocate(seq, n):
                if seq.spec_token_ids:  # the proposals give way before anything is preempted
                    n -= len(seq.spec_token_ids)
                    seq.spec_token_ids.clear()
                    continue
                victim = self._lowest_running()
                if victim in step.scheduled:  # it stood before `seq` in the running list
                    index -= 1
                self._preempt(victim, step)
                if victim is seq:  # the next one, if any (only under priority), now stands at `index`
                    break
            else:
                step.take(seq, n)
                index += 1
        if not step.preempted:
            self._admit_waiting(step)
        self._long_holds = self._long_holds + 1 if shares.held_long else 0
        self.yielding.stepped(step.scheduled, shares.yielding_from, shares.yielding_spent)
        recurrent = self.state_slots is not None
        scheduled = sorted(step.scheduled.items(), key=lambda item: not _decodes(*item, recurrent))  # decodes first
        batch = ScheduledBatch([seq for seq, _ in scheduled], [n for _, n in scheduled], step.preempted,
                               recurrent=recurrent)  # fmt: skip
        if self.state_slots is not None:
            rolled_back = {seq: self._rollbacks.pop(seq) for seq in list(self._rollbacks) if seq in step.scheduled}
            batch.restores = {seq: slot for seq, slot in step.restores.items() if seq in step.scheduled} | rolled_back
            batch.state_writes = {seq: states for seq, states in step.state_writes.items() if seq in step.scheduled}
            tiered = self.tiers is not None
            batch.checkpoints = plan_checkpoints(self.state_slots, self.block_manager, scheduled, tiered)
        if self.tiers is not None:  # the blocks this schedule evicted go down before the step writes them
            self.tiers.store_evicted()
        return batch

    def num_held_back(self) -> int:
        """Waiting long prompts that start only once a running long prompt is through (`long_prefills.py`): whoever
        feeds the engine may give it as many more requests, which start ahead of them. One an admission gate holds
        back (its adapter's slot, its `n` group's prompt) waits for that, not for a long prompt: it is not counted."""
        return self._shares().held_back(filter(self.may_start, self.waiting))

    def _shares(self) -> PrefillShares:
        """The prefills' shares of the step to come, from the sequences running now."""
        c = self.config
        alone = c.long_prefill_whole_alone and len(self.running) + len(self.waiting) == 1 and self.shorts.quiet()
        yielding_from, yielding_tokens = self.yielding.plan((*self.running, *self.waiting))
        return PrefillShares(c.long_prefill_token_threshold, c.max_num_partial_prefills, c.max_long_partial_prefills,
                             self.running, c.long_prefill_context_scale, chunk_tokens=c.long_prefill_chunk_tokens,
                             scored_tokens=c.long_prefill_scored_tokens, alone=alone, yielding_from=yielding_from,
                             yielding_tokens=yielding_tokens)  # fmt: skip

    def _admit_waiting(self, step: _Step) -> None:
        """Starts waiting sequences in serving order while the step has budget, a seat and blocks for them; one
        without its prefill's share this step (a long prompt with the long seats taken) is passed over, and the ones
        behind it start ahead of it."""
        line, place = list(self.waiting), 0
        while place < len(line) and step.budget > 0:
            seq = line[place]
            if seq in step.preempted:  # made room for the ones before it: taking it back now would undo that
                break
            if not self.may_start(seq):
                place += 1
                continue
            cached, computed = self._start_point(seq)
            n = step.shares.share(seq, computed, min(seq.num_tokens - computed, step.budget))
            n = self._whole_runs(seq, computed, n, step.budget)
            if n == 0 or not step.shares.has_seats(seq, computed, n):
                place += 1
                continue
            if len(self.running) >= self.config.max_num_seqs and not self._preempt_below(seq, step):
                break
            if not self._allocate_preempting(seq, n, cached, step):
                if self.running or not self._release_imported_kv():
                    break
                continue  # it may fit now
            self.waiting.remove(seq)
            place += 1
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = computed
                if self.tiers is not None and computed == len(cached) * self.block_manager.block_size:  # not imported
                    seq.cached_by_tier = self.tiers.cached_by_tier(seq, cached)
            seq.num_computed_tokens = computed
            seq.status = SequenceStatus.RUNNING
            for gate in self.gates:
                gate.started(seq)
            if self.state_slots is not None and cached:  # its recurrent states resume from the checkpoint after them
                step.restores[seq] = self.state_slots.restore(self.block_manager.blocks[cached[-1]].hash)
            if seq.imported_states is not None:
                step.state_writes[seq], seq.imported_states = seq.imported_states, None
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.time()
            self.running.append(seq)
            step.take(seq, n, admitted=True)

    def _whole_runs(self, seq: Sequence, computed: int, n: int, budget: int) -> int:
        """`n` as a model whose pictures attend both ways may compute it: ending outside every picture's run."""
        if not (self.config.whole_media_runs and n and seq.mm_features):
            return n
        return whole_runs_chunk(seq, computed, n, budget)

    def _start_point(self, seq: Sequence) -> tuple[list[int], int]:
        """The cached blocks a waiting `seq` starts from, and how many of its tokens they (or imported KV) hold."""
        if seq.block_table:  # its prompt's KV came from a prefill worker: already in its own blocks
            return [], seq.num_computed_tokens
        if seq.scores_prompt:  # a cached prefix's logits are gone: its prompt logprobs need them computed
            return [], 0
        if self.tiers is not None:
            self.tiers.revive(seq)
        resumable = self._has_checkpoint if self.state_slots is not None else None
        cached = self.block_manager.find_cached_prefix(seq, resumable)
        return cached, len(cached) * self.block_manager.block_size

    def _has_checkpoint(self, hashes: list[int]) -> bool:
        """Whether the recurrent states after the prefix of these blocks are kept (a prefix hit resumes from them)."""
        return self.state_slots.has_checkpoint(hashes[-1])

    def _allocate_preempting(self, seq: Sequence, n: int, cached: list[int], step: _Step) -> bool:
        """Blocks for the waiting `seq`'s `n` tokens, freeing those of running sequences that rank below it (under
        `priority`) until they fit or none is left to free."""
        while not self.block_manager.allocate(seq, n, cached):
            if not self._preempt_below(seq, step):
                return False
        return True

    def _preempt_below(self, seq: Sequence, step: _Step) -> bool:
        """Under `priority`, preempts the lowest running sequence if it ranks below the waiting `seq`; whether it
        did. Under `fcfs` a waiting sequence never preempts: it waits for its turn."""
        if not (self.by_priority and self.running):
            return False
        victim = self._lowest_running()
        if serving_order(victim) <= serving_order(seq):
            return False
        self._preempt(victim, step)
        return True

    def _lowest_running(self) -> Sequence:
        """The running sequence to preempt first: the most recently admitted, or under `priority` the one served
        last (the most recently admitted among equals)."""
        if self.by_priority:
            return max(reversed(self.running), key=serving_order)
        return self.running[-1]

    def _release_imported_kv(self) -> bool:
        """Frees the imported KV that waiting sequences hold: with nothing running, those blocks are all that can stop
        the head from starting, and waiting on them would deadlock. Their full blocks stay in the prefix cache, so
        the recompute that follows may still find them."""
        holders = [seq for seq in self.waiting if seq.block_table]
        for seq in holders:
            self.block_manager.free(seq)
            seq.num_computed_tokens, seq.imported_states = 0, None
        return bool(holders)

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        self.running.remove(seq)
        seq.spec_token_ids.clear()
        step.drop(seq)
        self._release(seq, finished=False)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.prepend(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends `seq` (stop condition, abort or error) and releases its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.spec_token_ids.clear()
        self._release(seq, finished=True)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _release(self, seq: Sequence, finished: bool) -> None:
        """Gives back what `seq` holds: its blocks, and what its gates gave it (a state seat, an adapter's slot)."""
        self.block_manager.free(seq)
        self._rollbacks.pop(seq, None)
        for gate in self.gates:
            gate.stopped(seq, finished)

    def complete_step(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advances each sequence past the tokens just computed; returns those whose next token is sampled now. A
        sequence's proposed tokens are not counted computed here: the engine counts those the model accepts."""
        if self.state_slots is not None:
            self.state_slots.step_done()
        sampled = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            computed = seq.num_computed_tokens
            seq.num_computed_tokens += n - len(seq.spec_token_ids)
            self.block_manager.cache_full_blocks(seq)
            if computed < seq.num_prompt_tokens <= seq.num_computed_tokens:
                for gate in self.gates:
                    gate.prompt_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled

    def discard_step(self, batch: ScheduledBatch) -> None:
        """A step of a model with recurrent layers failed midway: its sequences' states may hold some layers'
        updates and not others', so each is preempted (recomputed from position 0 or a checkpoint), and the
        checkpoints it was to write are dropped."""
        for seq in batch.seqs:
            if seq in self.running:
                self._preempt(seq, _Step(0))
        self.state_slots.step_done(ran=False)

    def accept_proposed(self, seq: Sequence, n: int, proposed: int) -> None:
        """`seq`'s last step verified `n` of `proposed` tokens, now appended to it: their KV, written by that step,
        counts as computed, and their full blocks join the prefix cache. The rejected ones' KV lies past
        `num_computed_tokens`, where the next step overwrites it. A model with recurrent layers whose states went
        past the accepted tokens recomputes the accepted ones in its next step, from the states after the sequence's
        own tokens that the verifying step kept in its rollback slot: the next plan restores them."""
        if self.state_slots is not None and n < proposed:
            self._rollbacks[seq] = self.state_slots.rollback_slot(seq.state_slot)
            return
        seq.num_computed_tokens += n
        self.block_manager.cache_full_blocks(seq)
