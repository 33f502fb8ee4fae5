"""Picks the work of each engine step under one token budget (the vLLM v1 shape).

Running sequences go first: each needs its next token (decode) or the rest of a chunked prefill. Waiting sequences
then fill what is left of the budget, their cached prefix skipped. When the KV cache cannot grow a running sequence,
the most recently admitted one is preempted: its blocks are freed and it is recomputed later (its prefix blocks
are likely still cached). Requests join and leave the running batch between steps: continuous batching.

The scheduler owns the block manager (as in nano-vllm): every block a sequence gets or gives back goes through it,
so the engine and the runner never allocate."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sagellm.runtime.engine.block_manager import BlockManager
from sagellm.runtime.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # sequences in one batch
    max_num_batched_tokens: int  # token budget of one step (chunked prefill cuts prompts to fit)
    max_model_len: int  # prompt + output tokens of one sequence
    num_blocks: int  # KV cache blocks
    block_size: int  # tokens per block
    enable_prefix_caching: bool = True


@dataclass
class ScheduledBatch:
    """One step's work: `seqs[i]` computes `num_new_tokens[i]` tokens. Single-token entries come first (decodes)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.num_new_tokens if n == 1)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def import_prompt(self, seq: Sequence, write_kv: Callable[[int], None]) -> bool:
        """Gives a sequence whose prompt KV was computed elsewhere (a prefill worker) the blocks of its whole prompt,
        sharing those of its prefix already cached here; `write_kv(start)` then copies the prompt's KV from token
        `start` on into them. False without room: nothing changes, and the prompt is recomputed when scheduled."""
        cached = self.block_manager.find_cached_prefix(seq)
        start = len(cached) * self.block_manager.block_size
        if not self.block_manager.allocate(seq, seq.num_prompt_tokens - start, cached):
            return False
        write_kv(start)
        seq.num_computed_tokens = seq.num_prompt_tokens  # counted as cached tokens when admitted: none computed here
        self.block_manager.cache_full_blocks(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                index += 1
                continue
            break
        if not batch.preempted:
            self._admit_waiting(scheduled, budget)
        scheduled.sort(key=lambda item: item[1] != 1)  # decodes first, order otherwise kept
        batch.seqs = [seq for seq, _ in scheduled]
        batch.num_new_tokens = [n for _, n in scheduled]
        return batch

    def _admit_waiting(self, scheduled: list[tuple[Sequence, int]], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.block_table:  # its prompt's KV came from a prefill worker: already in its own blocks
                cached, computed = [], seq.num_computed_tokens
            else:
                cached = self.block_manager.find_cached_prefix(seq)
                computed = len(cached) * self.block_manager.block_size
            n = min(seq.num_tokens - computed, budget)
            if not self.block_manager.allocate(seq, n, cached):
                if self.running or not self._release_imported_kv():
                    break
                continue  # the head may fit now
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = computed
            seq.num_computed_tokens = computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n

    def _release_imported_kv(self) -> bool:
        """Frees the imported KV that waiting sequences hold: with nothing running, those blocks are all that can stop
        the head from starting, and waiting on them would deadlock. Their full blocks stay in the prefix cache, so
        the recompute that follows may still find them."""
        holders = [seq for seq in self.waiting if seq.block_table]
        for seq in holders:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
        return bool(holders)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends `seq` (stop condition, abort or error) and releases its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def complete_step(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advances each sequence past the tokens just computed; returns those whose next token is sampled now."""
        sampled = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled
