"""A rank of an engine's group other than 0: loads the model, keeps its part, then runs every step rank 0 orders.

    python -P -m sagellm.runtime.parallel.rank_worker '<RankSpec JSON>'

It has no scheduler and no sampler: each step's inputs arrive as a `StepInputs` from rank 0, or a KV hand-over to
take part in (an empty message ends the loop), and the logits the group computes are rank 0's to sample.
When rank 0 is gone the next collective fails and the rank exits, so no rank outlives its engine; when its process
ends, kill -9 included, the rank ends with it within a second (`common.parent_death`), wherever it waits."""

from __future__ import annotations

import os
import sys
import traceback
from typing import TYPE_CHECKING

from sagellm.common.logging import configure_logging
from sagellm.common.nursery_errors import named_failures
from sagellm.common.openmp import prefer_short_spin
from sagellm.common.parent_death import exit_with_parent
from sagellm.runtime.parallel.rank_spec import RankSpec

if TYPE_CHECKING:
    from sagellm.backends.base import HardwareBackend
    from sagellm.runtime.engine.lora_weights import LoraWeights
    from sagellm.runtime.models.loaded import LoadedModel


def main(argv: list[str] | None = None) -> None:
    exit_with_parent()  # first: rank 0's process killed outright takes this rank along
    prefer_short_spin()  # before torch loads
    configure_logging(os.environ.get("SAGELLM_LOG_LEVEL", "warning"))
    spec = RankSpec.decode((argv or sys.argv[1:])[0])
    code = serve(spec)
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown of torch and the weights


def serve(spec: RankSpec) -> int:
    import msgspec
    import structlog
    import torch

    from sagellm.backends import get_backend
    from sagellm.common.memory import drop_mapped_pages, return_freed_memory
    from sagellm.runtime.comm.collectives import CollectiveError, GroupAddress, open_store
    from sagellm.runtime.engine.model_runner import StepInputs
    from sagellm.runtime.engine.placement import place
    from sagellm.runtime.engine.runner_over_model import runner_over
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.parallel.layout import RankComms, RankLayout
    from sagellm.runtime.parallel.rank_spec import ORDERS, failed_key, ready_key
    from sagellm.runtime.parallel.take_part import take_part

    log = structlog.get_logger("sagellm.parallel")
    layout = RankLayout(spec.tensor_parallel_size, spec.pipeline_parallel_size, spec.rank)
    store = open_store(layout.world_size, GroupAddress(spec.host, spec.port))
    try:
        backend = get_backend(spec.backend)
        place(backend, spec.device_ids, spec.num_threads, spec.rank, layout.world_size, spec.adaptive_threads)
        comms = RankComms.open(layout, store, backend.collective_library, spec)
        for fd in (spec.world_fd, *spec.stage_fds):
            if fd is not None:
                os.close(fd)  # mapped
        model = load_model(spec.model, language_model_only=spec.language_model_only)
        runner = runner_over(
            model,
            backend,
            spec.cache,
            quantized=spec.quantized_weights,
            shard=layout.shard,
            stage=layout.stage,
            collectives=comms.stage,
            linear_dtype=getattr(torch, spec.dtype),
            int8_activations=spec.int8_activations,
            num_state_slots=spec.num_state_slots,
            lora=_lora_weights(spec, model, backend),
        )
        mapped = model.mapped
        del model
        return_freed_memory()
        drop_mapped_pages(mapped)
    except Exception as error:  # rank 0 says why: the one line of a failure the code named, else the traceback
        why = str(error) if named_failures(error) else f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
        store.set(failed_key(spec.rank), why)
        return 1
    store.set(ready_key(spec.rank), "1")
    decoder = msgspec.msgpack.Decoder(StepInputs | ORDERS)
    try:
        comms.connect()
        while message := comms.world.broadcast_bytes(None, 0):
            take_part(runner, layout, comms, decoder.decode(message))
    except CollectiveError as error:
        log.warning("parallel_rank_orphaned", rank=spec.rank, error=str(error))
        return 1
    return 0


def _lora_weights(spec: RankSpec, model: LoadedModel, backend: HardwareBackend) -> LoraWeights | None:
    """This rank's LoRA adapter weights, made as rank 0's are (None: the engine serves no adapters)."""
    if not spec.max_loras:
        return None
    from sagellm.runtime.engine.lora_weights import LoraWeights, adapted_shapes

    shapes = adapted_shapes(model.weights, model.quantized)
    return LoraWeights(shapes, spec.max_loras, spec.max_lora_rank, backend.kernels()["add_lora"], backend.device)


if __name__ == "__main__":
    main()
