"""Runs one scheduled batch through the lowered model graph and returns the logits of the rows to sample.

The runner owns the KV cache tensors and the plan; it turns a `ScheduledBatch` (sequences and how many tokens each
computes) into a `StepInputs` (plain numbers: token ids, positions, cache slots, the batch layout), then into the
tensors and attention metadata every layer shares. The first half needs the scheduler's sequences; the second only
the numbers, which is what a tensor parallel rank without a scheduler receives from rank 0 each step."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import torch

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.base import HardwareBackend
from sagellm.backends.quantized import QuantizedWeight
from sagellm.common.errors import Lost
from sagellm.runtime.engine.kv_cache import allocate_kv_caches, read_tokens, window_group, write_tokens
from sagellm.runtime.engine.kv_prefault import KVPrefault
from sagellm.runtime.engine.lora_weights import LoraWeights
from sagellm.runtime.engine.media_spans import chunk_runs
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.state_cache import allocate_state_caches
from sagellm.runtime.engine.thread_governor import fit_threads
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.execution_graph.lowering import Collectives, LoweringContext, lower
from sagellm.runtime.execution_graph.passes import optimize
from sagellm.runtime.execution_graph.plan import Plan
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.lora_adapter import LoraAdapter
from sagellm.runtime.models.mrope import StepRopeRows
from sagellm.runtime.models.pipeline_stages import PipelineStage
from sagellm.runtime.models.rope import rope_tables
from sagellm.runtime.models.tensor_parallel import TensorShard, rank_config, shard_tensor_parallel
from sagellm.runtime.multimodal.encoder_cache import EncoderCache
from sagellm.runtime.multimodal.mrope_positions import token_positions
from sagellm.runtime.multimodal.step_media import step_media


def cache_config(config: ModelConfig, shard: TensorShard | None, stage: PipelineStage | None) -> ModelConfig:
    """The config as one rank's KV cache and recurrent states see it: its own KV and linear attention heads, its
    stage's layers."""
    config = rank_config(config, shard)
    if stage is None:
        return config
    layers = stage.layers(config.num_layers)
    types = config.layer_types[layers.start : layers.stop] if config.layer_types else ()
    return dataclasses.replace(config, num_layers=len(layers), layer_types=types)


class RunnerLostError(Lost, RuntimeError):
    """The runner cannot run any step any more (a tensor parallel rank is gone): no request's doing."""


class StepInputs(msgspec.Struct, array_like=True, kw_only=True, tag="step"):
    """One step's batch as numbers (`ModelRunner.step_inputs`); `ModelRunner.tensors` makes the model's inputs."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    num_decodes: int
    decode_tables: list[list[int]]  # the decodes' block tables, padded with 0 to one width
    decode_context_lens: list[int]
    decode_continues: bool
    # (query start, query length, context length, block table, and for recurrent layers: the sequence's state slot,
    # the slot its states start from (-1: zeros), a checkpoint (tokens, slot) or None)
    prefills: list[tuple[int, int, int, list[int], int, int, tuple[int, int] | None]]
    logits_rows: list[int] | None  # None: every row is sampled
    decode_state_slots: list[int] = []  # a model with recurrent layers: each decode row's state slot
    decode_state_seeds: list[tuple[int, int]] = []  # and (slot, source) of those that start elsewhere (metadata)
    # A model whose sliding-window layers keep blocks of their own: the same tokens' slots, the decodes' and the
    # prefills' tables in those blocks (window_blocks.py).
    window_slots: list[int] = []
    window_decode_tables: list[list[int]] = []
    window_prefill_tables: list[list[int]] = []
    lora_slots: list[int] = []  # each row's LoRA adapter slot (-1: none); empty when no row has one
    # A model whose pictures attend both ways (Gemma 3): each prefill's picture runs (PrefillChunk.bidirectional);
    # empty for any other model.
    prefill_media_runs: list[list[tuple[int, int]]] = []
    # A parallel group's step with images or audio: the rows their embeddings replace (rank 0's encoder made them;
    # the embeddings follow the step as one tensor, `take_part`); empty otherwise.
    media_rows: list[int] = []
    # A Qwen-VL model's step with pictures: the time, height and width positions of each picture token, in order;
    # such a token's entry in `positions` is the rope table row composed from them (models/mrope.py)
    picture_positions: list[list[int]] = []


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
        shard: TensorShard | None = None,
        stage: PipelineStage | None = None,
        collectives: Collectives | None = None,
        prefault_kv_cache: bool = False,
        linear_dtype: torch.dtype = torch.float32,
        int8_activations: bool = False,
        mapped: Any = None,
        num_state_slots: int = 0,
        window_blocks: int = 0,
        graph: Graph | None = None,
        packed: dict[str, Any] | None = None,
        lora: LoraWeights | None = None,
        encoder: EncoderCache | None = None,
        max_step_tokens: int = 0,
    ) -> None:
        """`shard`: this process is one rank of a tensor parallel group, whose other ranks `collectives` reaches;
        `stage`: it runs one pipeline stage's layers (and holds their KV cache only); `prefault_kv_cache`: map the
        whole cache's memory in the background now, not just ahead of use; `linear_dtype`: the dtype the linears'
        weights are packed in (EngineConfig.dtype); `int8_activations`: the linears on Q4_0/Q4_1 and K-quant blocks
        round x to int8 (EngineConfig.int8_activations); `mapped`: the GGUF file `quantized` views (LoadedModel.mapped),
        whose pages are let go as each weight is packed; `num_state_slots`: the slots of a model's recurrent
        layers' states (state_cache.py); `window_blocks`: the blocks of the sliding-window layers' own cache group
        (window_blocks.py; 0: every layer's cache has `num_blocks`); `graph`: one of `config` other than its
        decoder's (build_mtp_graph's, or the decoder's with every row's hidden states), on one rank; `packed`:
        another runner's packed linears (`self.packed`) to bind as they are where this graph reads the same;
        `lora`: this rank's LoRA adapter weights, whose updates the linears they change add (one graph's);
        `encoder`: a model that sees images, its vision encoder (behind its cache), whose embeddings fill the
        placeholder rows of a step's prompts; `max_step_tokens`: the most tokens a step runs (the rope table's rows
        for a step's pictures where the model's rope is multimodal)."""
        self.config = config
        self.layers = stage.layers(config.num_layers) if stage else range(config.num_layers)
        self.backend = backend
        self.block_size = block_size
        self.device = backend.device
        own = cache_config(config, shard, stage)
        self.window_blocks = window_blocks if window_group(own) else 0
        self.kv_caches = allocate_kv_caches(own, num_blocks, block_size, self.device, window_blocks=self.window_blocks)
        self.state_caches = allocate_state_caches(own, num_state_slots, self.device)
        self._windowed = [bool(self.window_blocks and own.window_of(i)) for i in own.kv_layers]
        groups = [[t for pair, w in zip(self.kv_caches, self._windowed) if w == sliding for t in pair]
                  for sliding in (False, True)]  # fmt: skip
        self._prefault = KVPrefault(groups[0], everything=prefault_kv_cache)
        self._window_prefault = KVPrefault(groups[1], everything=prefault_kv_cache) if groups[1] else None
        if graph is not None and (shard or stage):
            raise ValueError("a runner of another graph than the decoder's runs on one rank")
        graph = graph or build_decoder_graph(config, self.layers)
        self.graph = optimize(shard_tensor_parallel(graph, config, shard) if shard else graph)
        # M-RoPE (Qwen-VL, the MTP head of one): a picture's tokens read rows of the rope table composed each step
        mrope = bool(config.mrope_section and max_step_tokens)
        tables = rope_tables(config, max_model_len, self.device, step_rows=max_step_tokens if mrope else 0)
        self._picture_rows = StepRopeRows(config, tables["global"], max_model_len) if mrope else None
        context = LoweringContext(
            backend=backend,
            weights=weights,
            kv_caches=self.kv_caches,
            rope_tables=tables,
            head_dim=config.head_dim,
            quantized=quantized or {},
            collectives=collectives,
            linear_dtype=linear_dtype,
            int8_activations=int8_activations,
            mapped=mapped,
            state_caches=self.state_caches,
            packed=dict(packed or {}),
            lora=lora,
        )
        self.lora = lora
        self.encoder = encoder
        self.plan: Plan = lower(self.graph, context)
        # A step without images still gives the graph's placeholder inputs: none to fill.
        self._no_media = dict.fromkeys(("mm_rows", "mm_embeds") & self.plan.input_slots.keys())
        self.packed = context.packed
        # The last step's every-row final hidden states, where the graph outputs them (what the MTP head reads).
        self.hidden_states: torch.Tensor | None = None
        self._last_decodes: list[tuple[Sequence, int]] = []  # (sequence, computed tokens) of last step's decodes

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [N, V] for the sequences whose last token this step computes, in batch order, each preceded by the
        rows that score its prompt (`Sequence.prompt_scored_positions`) and followed by one row per token proposed
        for it (speculative decoding). The states a sequence admitted now brought from a prefill worker are written
        into its seat first."""
        for seq, states in batch.state_writes.items():
            self.write_states(seq.state_slot, states)
        if self.encoder is None:
            return self.run(self.step_inputs(batch))
        scheduled = [(s.mm_features, s.num_computed_tokens, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        return self.run(self.step_inputs(batch), step_media(scheduled, self.encoder, self.device))

    @torch.inference_mode()
    def run(self, step: StepInputs, media: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
        """`media`: the step's image rows and embeddings (step_media.py), where it has any."""
        outputs = self.forward(step, media)
        self.hidden_states = outputs.get("hidden_states")
        return outputs["logits"]

    @torch.inference_mode()
    def forward(self, step: StepInputs, carried: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The graph's outputs: logits, or a pipeline stage's hidden and residual; `carried`: those of the stage
        before (or a step's image rows and embeddings)."""
        fit_threads()  # to the cores other programs leave this process
        if step.slots:
            self._prefault.written(max(step.slots) // self.block_size)
        if step.window_slots:
            self._window_prefault.written(max(step.window_slots) // self.block_size)
        if self.lora is not None:
            self.lora.begin_step(step.lora_slots)
        return self.plan.run(**self.tensors(step), **{**self._no_media, **(carried or {})})

    def step_inputs(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        window_slots: list[int] = []  # the same tokens' in the sliding-window layers' own blocks, if they have them
        logits_rows: list[int] = []
        lora_slots: list[int] = []  # each row's adapter slot, where some sequence has one
        prefills: list[tuple[int, int, int, list[int], int, int, tuple[int, int] | None]] = []
        pictures: list[list[int]] = [[], [], []]  # M-RoPE: each picture token's time, height and width positions
        media_runs: list[list[tuple[int, int]]] = []
        both_ways = self.config.media_attends_both_ways
        num_decodes = batch.num_decodes
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, table = seq.num_computed_tokens, seq.block_table
            if i >= num_decodes:
                source = batch.restores.get(seq, seq.state_slot if start else -1)
                prefills.append((len(ids), n, start + n, table, seq.state_slot, source, batch.checkpoints.get(seq)))
                if both_ways:
                    media_runs.append(chunk_runs(seq, start, n))
            logits_rows.extend(len(ids) + p - start for p in seq.prompt_scored_positions(n))
            ids.extend(seq.scheduled_token_ids(n))
            lora_slots.extend([seq.lora_slot] * n)  # its proposed tokens' rows too: verified under its adapter
            span = range(start, start + n)
            positions.extend(self._positions(seq, start, n, pictures) if self._picture_rows else span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            if self.window_blocks:
                window_slots.extend(seq.window_table[p // bs] * bs + p % bs for p in span)
            logits_rows.extend(range(len(ids) - seq.num_sampled_rows(n), len(ids)))
        # One decode row per token: a sequence's next token and each token proposed after it, each attending over the
        # cache up to its own position (the step writes all rows' K/V before any row attends: causal).
        decodes = [
            (s, s.num_computed_tokens + i)
            for s, n in zip(batch.seqs[:num_decodes], batch.num_new_tokens)
            for i in range(n)
        ]
        # Same decode rows as last step, each one token further: attention may extend last step's reads. Not where
        # proposals were verified (a rejected one's K/V is rewritten later) or are now.
        progress = decodes if len(decodes) == num_decodes else []
        last = self._last_decodes
        continues = bool(progress) and len(progress) == len(last)
        continues &= all(s is t and n == m + 1 for (s, n), (t, m) in zip(progress, last))
        self._last_decodes = progress
        width = max((len(s.block_table) for s, _ in decodes), default=0)
        window: dict[str, list] = {}
        if self.window_blocks:
            window["window_slots"] = window_slots
            window["window_decode_tables"] = [s.window_table + [0] * (width - len(s.window_table)) for s, _ in decodes]
            window["window_prefill_tables"] = [s.window_table for s in batch.seqs[num_decodes:]]
        return StepInputs(
            input_ids=ids,
            positions=positions,
            slots=slots,
            num_decodes=len(decodes),
            decode_tables=[s.block_table + [0] * (width - len(s.block_table)) for s, _ in decodes],
            decode_context_lens=[p + 1 for _, p in decodes],
            decode_continues=continues,
            prefills=prefills,
            logits_rows=None if len(logits_rows) == len(ids) else logits_rows,
            decode_state_slots=[s.state_slot for s, _ in decodes] if self.state_caches else [],
            decode_state_seeds=self._decode_state_seeds(batch, decodes),
            lora_slots=lora_slots if any(slot >= 0 for slot in lora_slots) else [],
            prefill_media_runs=media_runs if any(media_runs) else [],
            picture_positions=pictures if pictures[0] else [],
            **window,
        )

    def _positions(self, seq: Sequence, start: int, n: int, pictures: list[list[int]]) -> list[int] | range:
        """A sequence's tokens' positions under M-RoPE: a picture's tokens read rows past the table's positions,
        in step order, whose three positions join `pictures`."""
        if not any(f.grid for f in seq.mm_features):
            return range(start, start + n)
        positions, three = token_positions(seq.mm_features, start, n)
        for i, *thw in three:
            positions[i] = self._picture_rows.first + len(pictures[0])
            for column, p in zip(pictures, thw):
                column.append(p)
        return positions

    def _decode_state_seeds(self, batch: ScheduledBatch, decodes: list[tuple[Sequence, int]]) -> list[tuple[int, int]]:
        """(slot, source) of the decode rows that do not continue their own states: a sequence's first token (from
        zeros, source -1) and the one token left after a prefix hit (from the checkpoint)."""
        if not self.state_caches:
            return []
        starting = [s for s, _ in decodes if s in batch.restores or not s.num_computed_tokens]
        return [(s.state_slot, batch.restores.get(s, -1)) for s in starting]

    def tensors(self, step: StepInputs) -> dict[str, object]:
        runs = step.prefill_media_runs or [()] * len(step.prefills)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(step.slots, torch.int64),
            block_size=self.block_size,
            num_decode_tokens=step.num_decodes,
            prefills=[
                PrefillChunk(a, n, c, self._tensor(t, torch.int32), slot, source, at and tuple(at), tuple(spans))
                for (a, n, c, t, slot, source, at), spans in zip(step.prefills, runs)
            ],
            decode_continues=step.decode_continues,
        )
        if step.num_decodes:
            meta.decode_block_tables = self._tensor(step.decode_tables, torch.int32)
            meta.decode_context_lens = self._tensor(step.decode_context_lens, torch.int32)
        if step.decode_state_slots:
            meta.decode_state_slots = self._tensor(step.decode_state_slots, torch.int64)
            meta.decode_state_seeds = [tuple(seed) for seed in step.decode_state_seeds]
        vision = self.config.vision
        if vision is not None and vision.bidirectional_sliding_only and any(c.bidirectional for c in meta.prefills):
            # Gemma 4's full attention layers read the pictures causally (media_spans.py)
            causal = [dataclasses.replace(chunk, bidirectional=()) for chunk in meta.prefills]
            meta.full_layers = dataclasses.replace(meta, prefills=causal)
        if step.window_slots:
            meta.sliding = dataclasses.replace(
                meta,
                slot_mapping=self._tensor(step.window_slots, torch.int64),
                decode_block_tables=self._tensor(step.window_decode_tables, torch.int32) if step.num_decodes else None,
                prefills=[
                    dataclasses.replace(chunk, block_table=self._tensor(table, torch.int32))
                    for chunk, table in zip(meta.prefills, step.window_prefill_tables)
                ],
            )
        if step.picture_positions:
            self._picture_rows.write(self._tensor(step.picture_positions, torch.int64))
        return {
            "input_ids": self._tensor(step.input_ids, torch.int64),
            "positions": self._tensor(step.positions, torch.int64),
            "attn_metadata": meta,
            # None = every row is sampled (a pure decode batch): the lm_head input needs no gather.
            "logits_indices": None if step.logits_rows is None else self._tensor(step.logits_rows, torch.int64),
        }

    def read_kv(
        self, slots: torch.Tensor, out: torch.Tensor | None = None, window_slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The K and V at `slots` in every layer, [num_layers, 2, n, Hk, D] (into `out` if given): a prompt's KV for
        a decode worker. `window_slots`: the same tokens' in the sliding-window layers' own blocks (-1: passed,
        read as zeros)."""
        return read_tokens(self.kv_caches, self._layer_slots(slots, window_slots), out)

    def write_kv(self, slots: torch.Tensor, kv: torch.Tensor, window_slots: torch.Tensor | None = None) -> None:
        """Stores `read_kv`'s K and V (another engine's) at `slots` (and `window_slots`, where not -1)."""
        if slots.numel():
            self._prefault.written(int(slots.max()) // self.block_size)
        if window_slots is not None and window_slots.numel():
            self._window_prefault.written(int(window_slots.max()) // self.block_size)
        write_tokens(self.kv_caches, self._layer_slots(slots, window_slots), kv)

    def kv_written(self, block: int, sliding: bool = False) -> None:
        """Block `block` (of the sliding-window layers' own group, `sliding`) is being written from outside a step
        (a tier's copy): its pages are mapped ahead as a step's writes would map them."""
        prefault = self._window_prefault if sliding else self._prefault
        if prefault is not None:
            prefault.written(block)

    @property
    def windowed_caches(self) -> list[bool]:
        """For each of `kv_caches`, whether it is a sliding-window layer's with blocks of its own (window_blocks.py)."""
        return self._windowed

    def _layer_slots(self, slots: torch.Tensor, window_slots: torch.Tensor | None) -> torch.Tensor | list[torch.Tensor]:
        if not self.window_blocks:
            return slots
        if window_slots is None:
            raise ValueError("this model's sliding-window layers keep blocks of their own: their slots are needed")
        return [window_slots if windowed else slots for windowed in self._windowed]

    def read_states(self, slot: int) -> torch.Tensor:
        """The recurrent states in `slot`, every linear attention layer's convolution window then delta-rule state,
        as one flat float32 tensor: a prompt's states for a decode worker."""
        return torch.cat([t[slot].reshape(-1) for pair in self.state_caches for t in pair])

    @property
    def states_size(self) -> int:
        """How many values `read_states` gives (0: the model has no recurrent layers)."""
        return sum(t[0].numel() for pair in self.state_caches for t in pair)

    def copy_states(self, source: int, slot: int) -> None:
        """Every linear attention layer's states in `source` copied into `slot` (a draft model's shadows keep and take
        back theirs so; the target's rollbacks are planned: `ScheduledBatch.restores`)."""
        for pair in self.state_caches:
            for states in pair:
                states[slot].copy_(states[source])

    def write_states(self, slot: int, states: torch.Tensor) -> None:
        """Stores `read_states`'s states (another engine's, `states_size` values) in `slot`."""
        tensors = [t for pair in self.state_caches for t in pair]
        for t, part in zip(tensors, states.to(self.device, torch.float32).split([t[slot].numel() for t in tensors])):
            t[slot].copy_(part.view(t[slot].shape))

    def release_kv_cache(self) -> bool:
        """Gives the KV cache's memory back to the kernel (a sleeping engine): on the CPU its pages are dropped and
        read as zeros, mapped again as the engine writes; False where that cannot be done (another device, no
        madvise), and nothing changed."""
        return self.device.type == "cpu" and all(p.release() for p in self._prefaults())

    def restore_kv_cache(self) -> None:
        """After `release_kv_cache`: the cache is mapped ahead of the writes again."""
        for prefault in self._prefaults():
            prefault.restore()

    def _prefaults(self) -> list[KVPrefault]:
        return [p for p in (self._prefault, self._window_prefault) if p is not None]

    def load_lora(self, slot: int, adapter: LoraAdapter) -> None:
        """Puts a LoRA adapter in `slot` of the adapter weights (of every rank, for a parallel group)."""
        assert self.lora is not None
        self.lora.load(slot, adapter.weights, adapter.rank, adapter.scaling)

    def close(self) -> None:
        """Releases what the runner started: the cache's prefault thread (and, for a tensor parallel group, its
        other ranks)."""
        self._prefault.close()
        if self._window_prefault is not None:
            self._window_prefault.close()

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
