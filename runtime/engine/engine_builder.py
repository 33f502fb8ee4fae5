"""What an engine is made of, built from its settings: the model, the backend it runs on, the KV cache's blocks and
the recurrent layers' state slots sized to this machine, the scheduler over them, the LoRA slots, the model runner
and the speculator.

Building is checking settings against the model and the machine, sizing and loading, in an order that matters (the
cache is sized after the model is loaded, so its weights are counted out; the loader's copies are dropped once the
runner has packed its own). It is done once, top to bottom, here; the engine (llm_engine.py) is made from the parts
and is only its loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from sagellm.backends import get_backend
from sagellm.backends.base import HardwareBackend
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.common.memory import drop_mapped_pages, return_freed_memory
from sagellm.common.progress import stage
from sagellm.runtime.engine.cache_geometry import CacheGeometry
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.kv_budget import kv_cache_blocks, window_group_blocks
from sagellm.runtime.engine.kv_cache import uniform_window, window_group
from sagellm.runtime.engine.kv_events.engine_events import EngineKvEvents, engine_kv_events
from sagellm.runtime.engine.kv_tiers.setup import prefix_tiers
from sagellm.runtime.engine.long_prefills import long_prefill_shares
from sagellm.runtime.engine.lora_slots import LoraSlots
from sagellm.runtime.engine.lora_weights import LoraWeights, adapted_shapes
from sagellm.runtime.engine.memory_report import memory_report
from sagellm.runtime.engine.model_runner import ModelRunner, cache_config
from sagellm.runtime.engine.placement import place
from sagellm.runtime.engine.runner_over_model import runner_over
from sagellm.runtime.engine.sampling_params import model_sampling_defaults
from sagellm.runtime.engine.scheduler import Scheduler, SchedulerConfig
from sagellm.runtime.engine.speculative.config import FIELD, parse_speculative_config, reads_mtp_head
from sagellm.runtime.engine.speculative.mtp import MtpProposer
from sagellm.runtime.engine.speculative.proposers import ProposerContext, TargetHead
from sagellm.runtime.engine.speculative.speculator import Speculator
from sagellm.runtime.engine.state_cache import bytes_per_state_slot
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.models.decoder_graph import build_decoder_graph
from sagellm.runtime.models.loaded import LoadedModel, ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.mtp_head import SHARED_WEIGHTS, head_weights, is_head_weight, with_head_layer
from sagellm.runtime.models.pipeline_stages import PipelineStage
from sagellm.runtime.models.tensor_parallel import TensorShard
from sagellm.runtime.multimodal.engine_media import EngineMedia, engine_media

log = structlog.get_logger("sagellm.engine")


@dataclass
class EngineParts:
    """What an `LLMEngine` is made from."""

    model: LoadedModel  # its weights dropped: the runner holds its own, packed
    sampling_defaults: dict[str, Any]  # what a request that sets nothing gets
    backend: HardwareBackend
    max_model_len: int  # the context, cut to the cache's blocks where they hold less
    scheduler: Scheduler
    runner: ModelRunner
    lora: LoraSlots | None  # with enable_lora
    speculator: Speculator | None  # with a speculative config
    head_kv: MtpProposer | None  # an MTP head, whose own KV a prefill's hand-over carries after the model's
    media: EngineMedia | None  # a model that sees images: its prompts' preprocessing and its encoder
    kv_events: EngineKvEvents | None  # with kv_events_config: every block cached or dropped, vLLM's events


@dataclass
class _CacheLayout:
    """One rank's cache (rank 0's: it holds the most KV heads, linear attention heads and layers of a group)."""

    rank0: ModelConfig  # the model as rank 0's cache sees it
    geometry: CacheGeometry
    window_blocks: int  # a sliding-window group's own blocks (window_blocks.py), 0 for none
    num_state_slots: int  # recurrent layers (Qwen3.5): a state slot per seat (state_slots.py) ...
    checkpoints: int  # ... and as many for the prefix cache's checkpoints of them ...
    rollbacks: int  # ... and where a speculative step keeps states from before its proposals


def build_engine(
    config: EngineConfig, loaded: LoadedModel | None, make_runner: Callable[..., ModelRunner]
) -> EngineParts:
    """The parts of an engine with `config`, on the model `loaded` (None: loaded from `config.model`), its runner
    made by `make_runner` (`LLMEngine`'s)."""
    spec = parse_speculative_config(config.speculative_config)
    mtp = reads_mtp_head(config.speculative_config)  # the model's own head guesses: read with the model
    _refuse_before_loading(config, loaded, make_runner, mtp)
    if config.seed is not None:
        torch.manual_seed(config.seed)  # unseeded rows draw from the global generator (the sampler)
    model = _load(config, loaded, mtp)
    sampling_defaults = model_sampling_defaults(model)  # a bad one in its files is refused now
    backend = get_backend(config.backend)
    linear_dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    if problem := backend.linear_dtype_problem(linear_dtype):
        raise FieldError("dtype", f"dtype {config.dtype}: {problem}")
    if config.int8_activations:
        kinds = {w.kind for w in model.quantized.values()} if config.quantized_weights else set()
        if problem := backend.int8_activations_problem(kinds):
            raise FieldError("int8_activations", f"int8_activations: {problem}")
    if config.world_size == 1:  # a group's rank 0 is placed by its runner, with the other ranks
        place(backend, config.device_ids, config.num_threads, adaptive=config.adaptive_threads)
    cache = _cache_layout(config, model.config, backend, mtp, spec is not None)
    lora, lora_weights = _lora_slots(config, model, backend) if config.enable_lora else (None, None)
    scheduler = Scheduler(_scheduler_config(config, model.config, cache, spec is not None), lora)
    media = engine_media(model.config, model.weights, model.processor_files, model.tokenizer, backend, linear_dtype,
                         config.limit_mm_per_prompt)  # fmt: skip
    runner = _runner(config, model, backend, cache, linear_dtype, lora_weights, make_runner, mtp, media)
    if lora is not None:
        lora.load = runner.load_lora
    head = _mtp_head(model, runner) if mtp else None
    # The plan holds what it needs (packed): drop the loader's copies, and give their memory back.
    model.weights, model.quantized = {}, {}
    return_freed_memory()
    drop_mapped_pages(model.mapped)
    speculator = None
    if spec is not None:
        with stage(f"preparing speculative decoding ({spec.method})"):
            context = ProposerContext(model.tokenizer, model.config.vocab_size, backend, cache.geometry,
                                      config.max_num_seqs, head)  # fmt: skip
            speculator = Speculator(spec, context, config.max_num_batched_tokens)
    log.info(
        "engine_ready",
        model=model.name,
        backend=backend.name,
        kv_blocks=cache.geometry.num_blocks,
        block_size=cache.geometry.block_size,
        max_model_len=cache.geometry.max_model_len,
        memory=memory_report([runner]).line(),  # this process's: weights, KV cache, the rest
    )
    head_kv = speculator.proposer if speculator is not None and mtp else None
    if config.kv_tiers:
        scheduler.tiers = prefix_tiers(config, model, backend, scheduler, runner, head_kv.runner if head_kv else None)
    events = engine_kv_events(config, scheduler)
    return EngineParts(model, sampling_defaults, backend, cache.geometry.max_model_len, scheduler, runner, lora,
                       speculator, head_kv, media, events)  # fmt: skip


def _refuse_before_loading(
    config: EngineConfig, loaded: LoadedModel | None, make_runner: Callable[..., ModelRunner], mtp: bool
) -> None:
    """Settings no model could serve, refused before any weight is read."""
    if config.world_size > 1 and make_runner is ModelRunner:
        raise InvalidInput(
            "tensor_parallel_size or pipeline_parallel_size > 1 needs ranks in other processes: start the engine "
            "with sagellm.runtime.parallel.engine.start_engine"
        )
    if loaded is None and not config.model:
        raise InvalidInput("EngineConfig.model: give the path of the model to load")
    if mtp and config.world_size > 1:
        raise FieldError(FIELD, f"{FIELD}: method mtp runs on a single-process engine (no tensor or pipeline "
                                "parallel yet)")  # fmt: skip


def _load(config: EngineConfig, loaded: LoadedModel | None, mtp: bool) -> LoadedModel:
    """The model (`loaded`, else read from `config.model`, with its MTP head when it proposes), checked against
    what the engine needs of it."""
    model = loaded or load_model(config.model, mtp_head=mtp, mmproj=config.mmproj,
                                 language_model_only=config.language_model_only)  # fmt: skip
    if model.tokenizer is None:
        raise ModelLoadError(f"{model.source}: the engine needs a tokenizer, and this model has none")
    if model.config.one_pipeline_stage and (config.pipeline_parallel_size or 1) > 1:
        raise InvalidInput("pipeline parallel: Gemma 4 and Gemma 3n (per-layer embeddings, shared KV, layer "
                           "scalars, AltUp) run as one pipeline stage; split them with tensor_parallel_size "
                           "instead")  # fmt: skip
    vision = model.config.vision
    stages = config.pipeline_parallel_size or 1
    deepstack = len(vision.deepstack_layers) if vision is not None else 0
    if stages > 1 and PipelineStage(0, stages).layers(model.config.num_layers).stop < deepstack:
        raise InvalidInput(f"pipeline parallel: {model.name}'s DeepStack adds its pictures' rows after layers 0 to "
                           f"{deepstack - 1}, which the first of {stages} stages does not hold all of; split it with "
                           "tensor_parallel_size instead")  # fmt: skip
    if model.config.media_attends_both_ways and config.max_num_batched_tokens < vision.tokens_per_image:
        # A picture's run is computed in one step (media_spans.py): a smaller budget could never start it.
        raise FieldError("max_num_batched_tokens", f"max_num_batched_tokens {config.max_num_batched_tokens}: "
                         f"{model.name}'s pictures are prefilled whole, {vision.tokens_per_image} tokens each, so a "
                         f"step's budget must hold at least that many")  # fmt: skip
    return model


def _runner(
    config: EngineConfig,
    model: LoadedModel,
    backend: HardwareBackend,
    cache: _CacheLayout,
    linear_dtype: torch.dtype,
    lora_weights: LoraWeights | None,
    make_runner: Callable[..., ModelRunner],
    mtp: bool,
    media: EngineMedia | None,
) -> ModelRunner:
    """The model runner over the cache, its weights packed for `backend` (with the hidden states an MTP head reads,
    the LoRA slots' weights, and the vision encoder of a model that sees images)."""
    state_slots = cache.num_state_slots + cache.checkpoints + cache.rollbacks
    with stage(f"preparing the weights for the {backend.name} backend"):
        return runner_over(
            model,
            backend,
            cache.geometry,
            make=make_runner,
            quantized=config.quantized_weights,
            prefault_kv_cache=config.prefault_kv_cache,
            linear_dtype=linear_dtype,
            int8_activations=config.int8_activations,
            **({"num_state_slots": state_slots} if cache.num_state_slots else {}),
            **({"window_blocks": cache.window_blocks} if cache.window_blocks else {}),
            **({"graph": build_decoder_graph(model.config, hidden_states=True)} if mtp else {}),
            **({"lora": lora_weights} if lora_weights is not None else {}),
            **({"encoder": media.encoder} if media is not None else {}),
        )


def _cache_layout(
    config: EngineConfig, model_config: ModelConfig, backend: HardwareBackend, mtp: bool, speculative: bool
) -> _CacheLayout:
    # The budget is each rank's: rank 0 holds the most KV heads, linear attention heads and layers of a group.
    rank0 = cache_config(
        model_config,
        TensorShard(0, config.tensor_parallel_size or 1),
        PipelineStage(0, config.pipeline_parallel_size or 1),
    )
    max_len = config.max_model_len or model_config.max_position_embeddings
    # An MTP head's one layer keeps KV in as many blocks: the budget holds its layer too.
    budgeted = with_head_layer(rank0) if mtp else rank0
    num_blocks = kv_cache_blocks(config, budgeted, max_len, backend.device.type)
    num_blocks, window_blocks = window_group_blocks(config, rank0, num_blocks, max_len)
    # A model with recurrent layers (Qwen3.5): a state slot per seat, and as many for the prefix cache's
    # checkpoints of them (state_slots.py).
    num_state_slots = config.max_num_seqs if model_config.num_linear_layers else 0
    checkpoints = num_state_slots if config.enable_prefix_caching else 0
    rollbacks = num_state_slots if speculative else 0  # where a step keeps states from before its proposals
    if num_state_slots:
        per_sequence = round(bytes_per_state_slot(rank0) / 2**20, 1)
        log.info("state_slots", seats=num_state_slots, checkpoints=checkpoints, rollbacks=rollbacks,
                 mib_per_slot=per_sequence)  # fmt: skip
    max_model_len = min(max_len, num_blocks * config.block_size)
    geometry = CacheGeometry(num_blocks=num_blocks, block_size=config.block_size, max_model_len=max_model_len,
                             max_step_tokens=config.max_num_batched_tokens)  # fmt: skip
    return _CacheLayout(rank0, geometry, window_blocks, num_state_slots, checkpoints, rollbacks)


def _scheduler_config(
    config: EngineConfig, model_config: ModelConfig, cache: _CacheLayout, speculative: bool
) -> SchedulerConfig:
    return SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=cache.geometry.max_model_len,
        num_blocks=cache.geometry.num_blocks,
        block_size=cache.geometry.block_size,
        # The windows of every layer, not rank 0's alone: a first pipeline stage of sliding layers alone must not give
        # back blocks a later stage's full attention layers still read
        window=window_group(model_config) if cache.window_blocks else uniform_window(model_config),
        num_window_blocks=cache.window_blocks,
        enable_prefix_caching=config.enable_prefix_caching,
        scheduling_policy=config.scheduling_policy,
        **long_prefill_shares(config.long_prefill_token_threshold, config.max_num_batched_tokens),
        max_num_partial_prefills=config.max_num_partial_prefills,
        max_long_partial_prefills=config.max_long_partial_prefills,
        long_prefill_context_scale=2 * model_config.hidden_size,  # where attention costs the linears' (CPU)
        num_state_slots=cache.num_state_slots,
        num_state_checkpoints=cache.checkpoints,
        speculative=speculative,
        whole_media_runs=model_config.media_attends_both_ways,
    )


def _lora_slots(config: EngineConfig, model: LoadedModel, backend: HardwareBackend) -> tuple[LoraSlots, LoraWeights]:
    """The adapters' slots over every weight of the model they may change, and this process's weights of them
    (read before the loader's copies are dropped).

    They compose with speculative decoding: a step's rows each name their sequence's slot, its proposed tokens' rows
    too (the runner's `step_inputs`), so the target verifies every proposal with the request's adapter. Proposers
    run without adapters (n-gram reads no model; a draft model's and an MTP head's runners bind no LoRA weights): a
    base model's guesses cost acceptance under an adapter, never tokens."""
    shapes = adapted_shapes(model.weights, model.quantized)
    if not shapes:
        raise FieldError("enable_lora", f"enable_lora: {model.name} has no weight LoRA adapters change")
    kernel = backend.kernels().get("add_lora")
    if kernel is None:
        raise FieldError("enable_lora", f"enable_lora: the {backend.name} backend has no add_lora kernel")
    weights = LoraWeights(shapes, config.max_loras, config.max_lora_rank, kernel, backend.device)
    return LoraSlots(shapes, config.max_loras, config.max_lora_rank), weights


def _mtp_head(model: LoadedModel, runner: ModelRunner) -> TargetHead:
    """The model's MTP head, for its proposer: its weights (the model's embeddings and lm_head among them) and
    the runner's packed lm_head (the head's layer 0 is not the model's, though named alike)."""
    weights = head_weights(model.weights)
    if not model.config.num_mtp_layers or not any(is_head_weight(name) for name in weights):
        raise FieldError(FIELD, f"{FIELD}: method mtp: {model.source} has no multi-token prediction head "
                                "(Qwen3.5 and Qwen3-Next checkpoints carry one)")  # fmt: skip
    shared = {name: runner.packed[name] for name in SHARED_WEIGHTS if name in runner.packed}
    return TargetHead(model.config, weights, shared)
