"""Starting an engine with whatever parallelism its config asks for: the one door the engine operators and `LLM`
use, so a size above 1 is never refused by one front end and honoured by another.

A size left unset is the planner's (`ParallelismOptimizer` over this machine's devices, from the model's config
alone): on a CPU that holds the model, one process; on GPUs, tensor parallel inside a fast-linked group and pipeline
stages across groups when one device cannot hold it. A model the planner finds fits nowhere still starts, in one
process, with its reason logged: the planner's budget is an estimate, the load is the test."""

from __future__ import annotations

import functools

import structlog

from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.speculative.config import reads_mtp_head
from sagellm.runtime.models.loaded import LoadedModel
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.parallel.group import ParallelRunner

log = structlog.get_logger("sagellm.parallel")


def start_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> LLMEngine:
    mtp = reads_mtp_head(config.speculative_config)
    if loaded is None and config.model:
        # once: the planner reads its config, the engine keeps it
        loaded = load_model(config.model, mtp_head=mtp, mmproj=config.mmproj,
                            language_model_only=config.language_model_only)  # fmt: skip
    if mtp:  # the MTP head proposes on a single process: nothing to plan
        config = config.replace(tensor_parallel_size=config.tensor_parallel_size or 1,
                                pipeline_parallel_size=config.pipeline_parallel_size or 1)  # fmt: skip
    config = planned(config, loaded)
    if config.world_size == 1:
        return LLMEngine(config, loaded)
    return LLMEngine(config, loaded, make_runner=functools.partial(ParallelRunner, engine=config))


def planned(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineConfig:
    """`config` with both parallel sizes set: the given ones kept, the unset ones the planner's."""
    if config.tensor_parallel_size is not None and config.pipeline_parallel_size is not None:
        return config
    from sagellm.runtime.comm.topology import machine_topology
    from sagellm.runtime.parallel.devices import Devices
    from sagellm.runtime.parallel.plan import PlanError
    from sagellm.runtime.parallel.planner import ParallelismOptimizer

    model = loaded or load_model(config.model, load_tokenizer=False, load_weights=False)
    devices = Devices.from_topology(machine_topology(), use_gpus=config.backend != "cpu")
    try:
        stored = stored_bytes_per_param(model) if devices.kind == "cpu" else None  # other backends dequantize
        planner = ParallelismOptimizer(weight_bytes_per_param=stored)
        choice = planner.recommend_strategy(model.config, devices).config
        tp, pp = choice.tp, choice.pp
    except PlanError as error:
        log.warning("parallelism_plan_failed", model=model.name, reason=str(error))
        tp = pp = 1
    return config.replace(
        tensor_parallel_size=config.tensor_parallel_size or tp,
        pipeline_parallel_size=config.pipeline_parallel_size or pp,
    )


def stored_bytes_per_param(model: LoadedModel) -> float | None:
    """Bytes a parameter takes as a GGUF file's blocks hold it (the CPU keeps them so), or None for weights read
    into the engine's dtype. Counted from the blocks kept and the dense weights beside them (norms, and kinds the
    kernels do not read, at 4 bytes); a file loaded without weights has none to count."""
    if not model.quantized:
        return None
    from sagellm.runtime.parallel.model_shape import ModelShape

    params = ModelShape.of(model.config).num_params()
    kept = sum(w.blocks.numel() for w in model.quantized.values())
    kept_params = sum(w.out_features * w.in_features for w in model.quantized.values())
    return (kept + 4 * max(0, params - kept_params)) / params
