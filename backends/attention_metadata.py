"""What an attention kernel needs to know about one batch: where each new token's K/V goes in the paged cache and
which cached tokens each query may see; for a model with recurrent layers, which state slot each sequence holds.

A batch is laid out decodes first (one token per sequence), then prefill chunks (several tokens of one sequence
each), the order the scheduler emits. The runner builds this once per step; every layer reuses it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    query_start: int  # offset of the chunk's first token in the batch's token dimension
    query_len: int  # tokens of this sequence computed in this step
    context_len: int  # tokens of this sequence in the cache after this step (earlier context + query_len)
    block_table: torch.Tensor  # int32 [num_blocks_of_seq]: the cache blocks holding the sequence, in order
    # A model with recurrent layers (Gated DeltaNet): the sequence's state slot, where the chunk reads its starting
    # states (its own slot when it continues the sequence, a prefix checkpoint's on a hit, -1: zeros, it starts at
    # position 0), and where a checkpoint is taken, (tokens into this chunk, the slot that keeps the states after
    # them).
    state_slot: int = -1
    source_slot: int = -1
    checkpoint: tuple[int, int] | None = None
    # A model whose pictures attend both ways (Gemma 3): the runs [start, end) of image tokens that overlap the chunk,
    # as sequence positions; a query inside one sees every key before its end, not only those up to itself.
    bidirectional: tuple[tuple[int, int], ...] = ()


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]: flat cache slot (block * block_size + offset) of each new token
    block_size: int
    num_decode_tokens: int = 0  # the first num_decode_tokens tokens are single-token decodes, one per sequence
    decode_block_tables: torch.Tensor | None = None  # int32 [num_decode, max_blocks], padded with 0
    decode_context_lens: torch.Tensor | None = None  # int32 [num_decode]: cached tokens incl. the new one
    # The decode rows are the same sequences, in the same order, as the previous step's, each one token further:
    # a kernel may extend what it read last step instead of reading every context again.
    decode_continues: bool = False
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode_state_slots: torch.Tensor | None = None  # int64 [num_decode]: each decode's state slot (recurrent layers)
    # (slot, source) of decode rows that do not continue their slot's states: set from slot `source` first (a prefix
    # checkpoint's), or to zeros (source -1: the sequence's first token).
    decode_state_seeds: list[tuple[int, int]] = field(default_factory=list)
    # A model whose sliding-window layers keep blocks of their own (window_blocks.py): the same batch in those
    # blocks (its slots, decode and prefill tables), which every layer with a window reads instead.
    sliding: AttentionMetadata | None = None
    # A model whose pictures attend both ways in its sliding-window layers alone (Gemma 4's "vision"): the same batch
    # with every chunk's picture runs causal, which its full attention layers read.
    full_layers: AttentionMetadata | None = None

    def for_window(self, window: int) -> AttentionMetadata:
        """The metadata a layer of this sliding window (0: none) attends with."""
        if window:
            return self.sliding if self.sliding is not None else self
        return self.full_layers if self.full_layers is not None else self

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
