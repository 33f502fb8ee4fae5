"""Runs one scheduled batch through the lowered model graph and returns the logits of the rows to sample.

The runner owns the KV cache tensors and the plan; it turns a `ScheduledBatch` (sequences and how many tokens each
computes) into flat tensors: token ids, positions, cache slots, and the attention metadata every layer shares."""

from __future__ import annotations

import torch

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.base import HardwareBackend
from sagellm.backends.quantized import QuantizedWeight
from sagellm.runtime.engine.kv_cache import allocate_kv_caches
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.execution_graph.lowering import LoweringContext, Plan, lower
from sagellm.runtime.execution_graph.passes import optimize
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.rope import cos_sin_table


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        backend: HardwareBackend,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        quantized: dict[str, QuantizedWeight] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.block_size = block_size
        self.device = backend.device
        self.kv_caches = allocate_kv_caches(config, num_blocks, block_size, self.device)
        self.graph = optimize(build_decoder_graph(config))
        context = LoweringContext(
            backend=backend,
            weights=weights,
            kv_caches=self.kv_caches,
            cos_sin=cos_sin_table(config, max_model_len, self.device),
            head_dim=config.head_dim,
            scale=config.head_dim**-0.5,
            quantized=quantized or {},
        )
        self.plan: Plan = lower(self.graph, context)
        self._last_decodes: list[tuple[Sequence, int]] = []  # (sequence, computed tokens) of last step's decodes

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [N, V] for the sequences whose last token this step computes, in batch order."""
        inputs = self.prepare_inputs(batch)
        return self.plan.run(**inputs)["logits"]

    def prepare_inputs(self, batch: ScheduledBatch) -> dict[str, object]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        prefills: list[PrefillChunk] = []
        num_decodes = batch.num_decodes
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, table = seq.num_computed_tokens, seq.block_table
            if n > 1:
                prefills.append(PrefillChunk(len(ids), n, start + n, self._tensor(table, torch.int32)))
            ids.extend(seq.token_ids[start : start + n])
            span = range(start, start + n)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            if start + n == seq.num_tokens:
                logits_rows.append(len(ids) - 1)
        decodes = batch.seqs[:num_decodes]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            block_size=bs,
            num_decode_tokens=num_decodes,
            prefills=prefills,
        )
        # Same decode rows as last step, each one token further: attention may extend last step's reads.
        progress = [(s, s.num_computed_tokens) for s in decodes]
        last = self._last_decodes
        meta.decode_continues = bool(progress) and len(progress) == len(last)
        meta.decode_continues &= all(s is t and n == m + 1 for (s, n), (t, m) in zip(progress, last))
        self._last_decodes = progress
        if num_decodes:
            width = max(len(s.block_table) for s in decodes)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in decodes]
            meta.decode_block_tables = self._tensor(tables, torch.int32)
            meta.decode_context_lens = self._tensor([s.num_computed_tokens + 1 for s in decodes], torch.int32)
        return {
            "input_ids": self._tensor(ids, torch.int64),
            "positions": self._tensor(positions, torch.int64),
            "attn_metadata": meta,
            # None = every row is sampled (a pure decode batch): the lm_head input needs no gather.
            "logits_indices": None if len(logits_rows) == len(ids) else self._tensor(logits_rows, torch.int64),
        }

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
