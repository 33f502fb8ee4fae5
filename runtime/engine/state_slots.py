"""Which state slot holds which recurrent states, for a model with recurrent layers (the bookkeeping of
state_cache.py's tensors, as the block manager is of the KV cache's).

Three kinds of slot. A running sequence holds a seat slot: it takes one when admitted and gives it back when it
finishes or is preempted (a preempted sequence is recomputed from position 0, which starts from zero states). With
speculative decoding each seat has a rollback slot too: a step verifying proposals keeps there the states after the
sequence's own tokens, before the proposed ones, for when some proposals are rejected. The
prefix cache holds checkpoint slots: the states after a block boundary of some prompt, keyed by the chained hash of
the blocks before that boundary (prefix_hash.py), so a later prompt with those blocks cached restores the states
and computes only what follows, as attention layers skip what their cached blocks hold. A checkpoint is planned when
a step is scheduled, written by that step, and usable from the next; the least recently used one is replaced when
all are taken, never one a scheduled step reads."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from sagellm.runtime.engine.kv_tiers.block_file import BlockMeta
from sagellm.runtime.engine.sequence import Sequence

if TYPE_CHECKING:
    from sagellm.runtime.engine.block_manager import BlockManager
    from sagellm.runtime.engine.window_blocks import WindowedBlocks


class StateSlots:
    def __init__(self, num_seats: int, num_checkpoints: int = 0, rollbacks: bool = False) -> None:
        self.num_seats, self.num_checkpoints = num_seats, num_checkpoints
        self.num_slots = num_seats * (2 if rollbacks else 1) + num_checkpoints
        self.rollbacks = rollbacks
        self._free_seats = list(range(num_seats - 1, -1, -1))  # popped from the end: slot 0 first
        self._free_checkpoints = list(range(num_seats + num_checkpoints - 1, num_seats - 1, -1))
        self._checkpoints: OrderedDict[int, int] = OrderedDict()  # prefix hash -> slot, least recently used first
        self._planned: dict[int, int] = {}  # written by the step being scheduled: usable once it completes
        self._read: set[int] = set()  # checkpoint slots the step being scheduled restores from
        # Where a checkpoint goes as its slot is replaced (the tiers under the prefix cache, kv_tiers/), called with
        # (prefix hash, slot, the meta of the prefix's last block) before the slot is written again.
        self.on_evict: Callable[[int, int, BlockMeta], None] | None = None
        self._meta: dict[int, BlockMeta] = {}  # prefix hash -> its last block's meta, of checkpoints given one

    # -- seats ----------------------------------------------------------------------------------------------------
    def can_seat(self) -> bool:
        return bool(self._free_seats)

    def seat(self, seq: Sequence) -> None:
        """Gives `seq` a seat slot (it must have none)."""
        seq.state_slot = self._free_seats.pop()

    def unseat(self, seq: Sequence) -> None:
        if seq.state_slot >= 0:
            self._free_seats.append(seq.state_slot)
            seq.state_slot = -1

    def rollback_slot(self, seat: int) -> int:
        """The slot that keeps a seat's states from before a step's proposed tokens (speculative decoding)."""
        assert self.rollbacks, "no rollback slots: the engine does not speculate"
        return self.num_seats + self.num_checkpoints + seat

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def has_checkpoint(self, prefix_hash: int) -> bool:
        return prefix_hash in self._checkpoints

    def restore(self, prefix_hash: int) -> int:
        """The slot of the checkpoint after the prefix `prefix_hash`, kept from replacement until the step ends."""
        self._checkpoints.move_to_end(prefix_hash)
        slot = self._checkpoints[prefix_hash]
        self._read.add(slot)
        return slot

    def plan_checkpoint(self, prefix_hash: int, meta: BlockMeta | None = None) -> int | None:
        """A slot for the step being scheduled to write the states after the prefix `prefix_hash` into; None when
        that checkpoint exists or is planned already, or no slot is free or replaceable. `meta`: the prefix's last
        block's (kept for `on_evict`)."""
        if prefix_hash in self._checkpoints or prefix_hash in self._planned:
            return None
        slot = self._take_checkpoint_slot()
        if slot is None:
            return None
        self._planned[prefix_hash] = slot
        if meta is not None:
            self._meta[prefix_hash] = meta
        return slot

    def adopt(self, prefix_hash: int, meta: BlockMeta) -> int | None:
        """A slot for the checkpoint after `prefix_hash` loaded from a tier, usable at once (the caller writes it
        before any step runs); None when no slot is free or replaceable."""
        slot = self._take_checkpoint_slot()
        if slot is not None:
            self._checkpoints[prefix_hash] = slot
            self._meta[prefix_hash] = meta
        return slot

    def checkpoints(self) -> list[tuple[int, int, BlockMeta]]:
        """(prefix hash, slot, meta) of every usable checkpoint that has a meta: what a flush to the tiers stores."""
        return [(h, s, self._meta[h]) for h, s in self._checkpoints.items() if h in self._meta]

    def _take_checkpoint_slot(self) -> int | None:
        """A free checkpoint slot, or the least recently used one no scheduled step reads (its checkpoint evicted)."""
        if self._free_checkpoints:
            return self._free_checkpoints.pop()
        oldest = next((h for h, s in self._checkpoints.items() if s not in self._read), None)
        if oldest is None:
            return None
        slot = self._checkpoints.pop(oldest)
        meta = self._meta.pop(oldest, None)
        if self.on_evict is not None and meta is not None:
            self.on_evict(oldest, slot, meta)
        return slot

    def step_done(self, ran: bool = True) -> None:
        """The scheduled step ended: its checkpoints become usable if it ran, or their slots free if it failed."""
        if ran:
            self._checkpoints.update(self._planned)
        else:
            self._free_checkpoints.extend(self._planned.values())
            for prefix_hash in self._planned:
                self._meta.pop(prefix_hash, None)
        self._planned.clear()
        self._read.clear()


def plan_checkpoints(
    slots: StateSlots, blocks: BlockManager | WindowedBlocks, scheduled: list[tuple[Sequence, int]], tiered: bool
) -> dict[Sequence, tuple[int, int]]:
    """A step's checkpoints, (tokens before it, slot) by sequence: for each chunk verifying proposals, one of its
    recurrent states after the sequence's own tokens into its seat's rollback slot; for each prefill chunk, one at
    the last block boundary it computes (at most the prompt's last token but one: a prompt that shares all of it
    still computes its last token). `tiered`: the prefix cache has tiers under it, which keep each block's meta."""
    plans: dict[Sequence, tuple[int, int]] = {}
    bs = blocks.block_size
    for seq, n in scheduled:
        start = seq.num_computed_tokens
        if seq.spec_token_ids:
            plans[seq] = (seq.num_tokens - start, slots.rollback_slot(seq.state_slot))
            continue
        boundary = min(start + n, seq.num_tokens - 1) // bs * bs
        if not blocks.enable_prefix_caching or n == 1 or boundary <= start:  # n == 1: a decode
            continue
        index = boundary // bs
        meta = blocks.block_meta(seq, index - 1) if tiered else None
        slot = slots.plan_checkpoint(blocks.prefix_hash(seq, index), meta)
        if slot is not None:
            plans[seq] = (boundary - start, slot)
    return plans
