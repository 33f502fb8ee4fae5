"""A prompt's KV handed from a prefill worker's engine to a decode worker's, both ends: the prefill side gathers it
out of its cache (`export`), the decode side writes it into blocks of its own (`writer`).

Both ends address the cache the same way (a sequence's positions to cache slots, with a sliding-window group's
own blocks where the model has one) and carry an MTP head's KV after the model's layers, so both live here, and the
output processor (which exports as a prefill worker's request ends) and the engine (which imports) share them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sagellm.runtime.engine.kv_cache import token_slots
from sagellm.runtime.engine.model_runner import ModelRunner
from sagellm.runtime.engine.scheduler import Scheduler
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.speculative.mtp import MtpProposer
from sagellm.runtime.engine.window_blocks import WindowedBlocks
from sagellm.runtime.models.config import ModelConfig

KvBuffer = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # (shape, dtype) -> where a hand-over is gathered


class KvHandOver:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, config: ModelConfig, head: MtpProposer | None):
        """`head`: an MTP head, which keeps KV of its own, carried after the model's layers."""
        self._runner, self._scheduler, self._config, self._head = runner, scheduler, config, head
        # Where a prefill's KV is gathered, (shape, dtype) -> tensor: shared memory when it leaves the process (set
        # by the prefill operator), so sending it copies nothing more; None: a new tensor.
        self.buffer: KvBuffer | None = None

    def export(self, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`seq`'s prompt KV [num_layers (+ 1 for an MTP head), 2, prompt_len, Hk, D], and with recurrent layers
        their states after the prompt."""
        slots, window_slots = self._slots(seq, 0, seq.num_prompt_tokens)
        c, head = self._config, self._head
        shape = (c.num_kv_layers + bool(head), 2, seq.num_prompt_tokens, *c.kv_row_shape)
        out = self.buffer(shape, torch.float32) if self.buffer else None
        if head is None:
            kv = self._runner.read_kv(slots, out, window_slots)  # [num_layers, 2, prompt_len, Hk, D]
        else:  # the MTP head's layer after the model's
            kv = out if out is not None else torch.empty(shape)
            self._runner.read_kv(slots, kv[: c.num_kv_layers], window_slots)
            head.read_kv(slots, kv[c.num_kv_layers :])
        states = self._runner.read_states(seq.state_slot) if self._scheduler.state_slots is not None else None
        return kv, states

    def writer(self, seq: Sequence, kv: torch.Tensor) -> Callable[[int], None]:
        """What writes `export`'s `kv` of `seq`'s prompt into its blocks from token `start` on (what
        `Scheduler.import_prompt` calls, once it has the blocks)."""
        layers = self._config.num_kv_layers  # past them, a prefill worker's MTP head's layer
        kv, head_kv = kv[:layers], (kv[layers:] if kv.shape[0] > layers and self._head is not None else None)
        n = seq.num_prompt_tokens

        def write_kv(start: int) -> None:
            slots, window_slots = self._slots(seq, start, n)
            self._runner.write_kv(slots, kv[:, :, start:], window_slots)
            if head_kv is not None:
                self._head.write_kv(seq, slots, head_kv[:, :, start:])

        return write_kv

    def _slots(self, seq: Sequence, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cache slots of `seq`'s positions [start, end), and where its sliding-window layers keep blocks of
        their own (window_blocks.py), theirs; -1 for a position a sliding group has passed (in the one group too,
        when every layer slides)."""
        bs, device, blocks = self._runner.block_size, self._runner.device, self._scheduler.block_manager
        if not isinstance(blocks, WindowedBlocks):  # one group, which slides when every layer does
            return token_slots(seq.block_table, start, end, bs, device, blocks.null_block), None
        slots = token_slots(seq.block_table, start, end, bs, device)
        return slots, token_slots(seq.window_table, start, end, bs, device, blocks.sliding.null_block)
