"""`ParallelismOptimizer.recommend_strategy(model, devices)`: how to split a model over the devices there are.

Every split the devices allow is sized (weights and a KV budget on the fullest device) and ranked:

1. it must fit: weights plus the KV cache of `kv_tokens` tokens (default: the model's context, the least an engine
   serving that context needs) within the usable share of each device's memory;
2. the fewest devices per replica (tp x pp) at which a split is roomy, its weights taking at most `weights_share`
   (half) of the usable memory so the KV cache, which lets an engine batch requests, gets at least as much; when no
   split is roomy, the fewest at which one fits. Fewer devices per replica: less communication and more replicas
   (dp) for what is left;
3. at that size, even head splits before uneven ones (our tensor parallelism can give ranks unequal whole GQA groups,
   but the fullest rank sets the pace), then tensor before pipeline parallel (a pipeline adds a stage's latency and
   bubbles), then, for a mixture of experts, experts spread whole over ranks (ep) before sliced.

Tensor parallelism never leaves a fast-link group (it talks every layer); pipeline stages cross groups; a rank holds
whole GQA groups of each layer (and a Gated DeltaNet's whole key heads), so tp never exceeds the KV heads of any
layer (Gemma 4's full attention layers have fewer), nor those. A model whose graph needs every layer (Gemma 4, 3n)
is never split into pipeline stages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.parallel.config import ParallelismConfig
from sagellm.runtime.parallel.devices import Devices
from sagellm.runtime.parallel.explain import explain
from sagellm.runtime.parallel.model_shape import DTYPE_BYTES, GIB, ModelShape
from sagellm.runtime.parallel.plan import Alternative, PlanError, Recommendation

DEFAULT_DTYPE = {"gpu": "bf16", "cpu": "fp32"}  # what each kind of device computes in


@dataclass(frozen=True)
class ParallelismOptimizer:
    dtype: str | None = None  # of weights and KV cache; None: bf16 on GPUs, fp32 on the CPU
    # Bytes a weight parameter takes where not the dtype's: a GGUF file's blocks, kept as they are (~0.6 for Q4_K_M).
    weight_bytes_per_param: float | None = None
    kv_tokens: int | None = None  # KV cache each replica must hold; None: the model's context length
    weights_share: float = 0.5  # of usable memory, beyond which a split is tight

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise InvalidInput(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.weight_bytes_per_param is not None and not self.weight_bytes_per_param > 0:
            raise InvalidInput(f"weight_bytes_per_param must be > 0, got {self.weight_bytes_per_param}")
        if self.kv_tokens is not None and self.kv_tokens < 1:
            raise InvalidInput(f"kv_tokens must be >= 1, got {self.kv_tokens}")

    def recommend_strategy(self, model: ModelConfig | ModelShape, devices: Devices) -> Recommendation:
        """The best split of `model` over `devices`, the others considered, and why; PlanError if none fits."""
        shape = model if isinstance(model, ModelShape) else ModelShape.of(model)
        dtype = self.dtype or DEFAULT_DTYPE[devices.kind]
        tokens = self.kv_tokens or shape.config.max_position_embeddings
        sized = [self._size(shape, devices, split, DTYPE_BYTES[dtype], tokens) for split in candidates(shape, devices)]
        fitting = [a for a in sized if a.fits]
        roomy = [a for a in fitting if a.roomy]
        size = min((a.config.replica_size for a in roomy or fitting), default=0)
        ranked = sorted(sized, key=lambda a: _rank(a, size))
        why = explain(shape, devices, ranked, dtype, tokens, self.weight_bytes_per_param)
        if not ranked[0].fits:
            raise PlanError(why, ranked)
        return Recommendation(ranked[0], ranked, why)

    def _size(
        self, shape: ModelShape, devices: Devices, split: ParallelismConfig, dtype_bytes: int, tokens: int
    ) -> Alternative:
        weights = shape.weights_per_device(split, self.weight_bytes_per_param or dtype_bytes) / GIB
        kv = shape.kv_per_device(split, tokens, dtype_bytes) / GIB
        return Alternative(
            split,
            weights,
            kv,
            devices.usable_gib,
            roomy=weights <= self.weights_share * devices.usable_gib,
            uneven=any(heads % split.tp for heads in _kv_head_counts(shape.config)),
        )


def candidates(shape: ModelShape, devices: Devices) -> Iterator[ParallelismConfig]:
    """Every split that uses all the devices: tp dividing a fast-link group and at most the KV heads of any layer
    (and linear attention key heads), pp dividing what is left and at most the layers (1 for a model that is one
    stage), dp the rest; for a mixture of experts, ep unused and at its widest."""
    config = shape.config
    for tp in _divisors(devices.group_size):
        if tp > min(_kv_head_counts(config)) or (config.num_linear_layers and tp > config.linear_num_key_heads):
            continue
        for pp in _divisors(devices.count // tp):
            if pp > config.num_layers or (pp > 1 and config.one_pipeline_stage):
                continue
            dp = devices.count // (tp * pp)
            for ep in _expert_choices(shape, tp, dp):
                yield ParallelismConfig(tp, pp, dp, ep)


def _kv_head_counts(config: ModelConfig) -> set[int]:
    """The KV head counts of the model's attention layers (Gemma 4's full attention layers have one of their own)."""
    return {config.num_kv_heads_of(i) for i in config.kv_layers or [0]}


def _expert_choices(shape: ModelShape, tp: int, dp: int) -> list[int]:
    """1, and the most ranks of the stage (a multiple of tp) that share the experts out evenly."""
    if not shape.is_moe:
        return [1]
    spread = [d for d in _divisors(tp * dp) if d > 1 and d % tp == 0 and shape.num_experts % d == 0]
    return [1, max(spread)] if spread else [1]


def _rank(alternative: Alternative, size: int) -> tuple[float, ...]:
    """The sort key of the module's ranking; `size` is the replica size chosen in step 2."""
    split = alternative.config
    other_size = split.replica_size != size
    return (
        not alternative.fits,
        other_size,
        other_size and not alternative.roomy,
        alternative.uneven,
        split.replica_size,
        split.pp,
        -split.ep,
        alternative.total_gib,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
