"""The seed API's parallelism names over sageLLM's planner (`runtime/parallel/planner.py`, `sagellm plan`): a
`ParallelismConfig` record of tp/pp/dp/ep degrees, and a `ParallelismOptimizer` whose answers are the planner's.

The seed's questions give a model's size and GPUs as numbers, while the planner sizes a model's shape (layers, KV
heads, KV bytes a token) on devices; `model_of_size` makes the shape: a Llama-3-shaped dense model whose bf16 weights
take that many GB. Sizes are in GB as the planner counts them (GiB), GPUs in nodes of 8 sharing a fast link (tensor
parallelism stays inside one). The seed's per-GPU-count rules (`select_strategy`, its strategy classes) are not
here: a split that ignores the model is not one the planner would give."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.parallel import config as split_config
from sagellm.runtime.parallel import planner
from sagellm.runtime.parallel.devices import Devices
from sagellm.runtime.parallel.model_shape import DTYPE_BYTES, GIB, ModelShape
from sagellm.runtime.parallel.plan import PlanError

# The kinds of split `supported_strategies` names: one kind of degree above 1, or several ("hybrid").
STRATEGY_KINDS = ("tp", "pp", "dp", "ep", "hybrid")
# Llama 3's widths (hidden, heads, MLP) with their layer counts; all have 8 KV heads of 128 dims, 128256 tokens.
LLAMA3_WIDTHS = (
    (2048, 32, 8192, 16),  # 1B
    (3072, 24, 8192, 28),  # 3B
    (4096, 32, 14336, 32),  # 8B
    (8192, 64, 28672, 80),  # 70B
    (16384, 128, 53248, 126),  # 405B
)
KV_HEADS, HEAD_DIM, VOCAB, CONTEXT = 8, 128, 128256, 8192


@dataclass
class ParallelismConfig:
    """A split of one model over GPUs (the seed's fields), with the README's `auto_optimize` (the optimizer chooses
    the degrees, as an engine whose sizes are unset gets the planner's; False: they are the ones written here) and
    `supported_strategies` (the kinds of split it may choose: "TP", "PP", "DP", "EP", or "Hybrid" for several
    above 1; None: any). `max_seq_length` is the KV cache the optimizer keeps room for; the other hints describe."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    total_gpus: int = 1
    gpu_memory_gb: float = 0.0
    model_size_gb: float = 0.0
    max_seq_length: int = 2048
    batch_size: int = 1
    auto_optimize: bool = False
    supported_strategies: list[str] | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.supported_strategies or [] if str(s).lower() not in STRATEGY_KINDS]
        if unknown:
            raise FieldError(
                "supported_strategies", f"supported_strategies: {unknown} are not among TP, PP, DP, EP, Hybrid"
            )

    @property
    def total_parallel_size(self) -> int:
        """The GPUs the split uses, tp x pp x dp: expert parallelism spreads experts over those same ranks (the seed
        multiplied ep in too)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def validate(self) -> bool:
        """Whether sageLLM runs this split on `total_gpus` GPUs: degrees of at least 1, ep dividing the tp x dp ranks
        of a stage, no context or sequence parallelism (sageLLM has neither)."""
        try:
            split = self.split
        except InvalidInput:
            return False
        fits = split.world_size <= self.total_gpus
        return fits and self.context_parallel_size == 1 and not self.sequence_parallel

    @property
    def split(self) -> split_config.ParallelismConfig:
        """The runtime's split of these degrees; InvalidInput when it has none."""
        return split_config.ParallelismConfig(
            self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size, self.expert_parallel_size
        )

    def allows(self, split: split_config.ParallelismConfig) -> bool:
        """Whether `split` is of a kind in `supported_strategies` (one GPU is of every kind)."""
        if self.supported_strategies is None:
            return True
        used = [kind for kind, degree in zip(STRATEGY_KINDS, (split.tp, split.pp, split.dp, split.ep)) if degree > 1]
        kind = "hybrid" if len(used) > 1 else used[0] if used else None
        return kind is None or kind in {str(s).lower() for s in self.supported_strategies}


class ParallelismOptimizer:
    """The planner's split for a model size on GPUs, restricted to `config.supported_strategies`. `config` (default:
    `ParallelismConfig(auto_optimize=True)`) also gives `optimize_hybrid_config`, which names only a GPU count, the
    model and GPU sizes, and with `auto_optimize=False` the degrees it keeps."""

    def __init__(self, config: ParallelismConfig | None = None) -> None:
        self.config = config or ParallelismConfig(auto_optimize=True)
        self.planner = planner.ParallelismOptimizer(kv_tokens=self.config.max_seq_length)

    def recommend_strategy(self, model_size_gb: float, gpu_count: int, gpu_memory_gb: float) -> ParallelismConfig:
        """The best split the planner finds of a `model_size_gb` model over `gpu_count` GPUs of `gpu_memory_gb`
        (all used: dp takes what one replica does not), among the allowed kinds; PlanError when none fits."""
        devices = Devices.gpus(gpu_count, gpu_memory_gb)
        plan = self.planner.recommend_strategy(model_of_size(model_size_gb), devices)
        allowed = [a for a in plan.alternatives if a.fits and self.config.allows(a.config)]
        if not allowed:
            kinds = ", ".join(self.config.supported_strategies or [])
            raise PlanError(
                f"no split of the kinds {kinds} fits a {model_size_gb:g} GB model on {devices.describe()}; "
                f"the planner recommends {plan.config}",
                plan.alternatives,
            )
        split = allowed[0].config
        return replace(
            self.config,
            tensor_parallel_size=split.tp,
            pipeline_parallel_size=split.pp,
            data_parallel_size=split.dp,
            expert_parallel_size=split.ep,
            total_gpus=gpu_count,
            gpu_memory_gb=gpu_memory_gb,
            model_size_gb=model_size_gb,
        )

    def optimize_hybrid_config(self, gpu_count: int) -> tuple[int, int, int]:
        """(tp, pp, dp) for `gpu_count` GPUs: the planner's for `config`'s model and GPU sizes, or with
        `auto_optimize=False` the config's own degrees, if they run on that many."""
        c = self.config
        if not c.auto_optimize:
            if not replace(c, total_gpus=gpu_count).validate():
                raise InvalidInput(f"the configured split {c.split} does not run on {gpu_count} GPUs")
            return c.tensor_parallel_size, c.pipeline_parallel_size, c.data_parallel_size
        if c.model_size_gb <= 0 or c.gpu_memory_gb <= 0:
            raise InvalidInput(
                "optimize_hybrid_config: the split depends on the model and the GPUs; give "
                "ParallelismOptimizer(ParallelismConfig(auto_optimize=True, model_size_gb=..., gpu_memory_gb=...))"
            )
        best = self.recommend_strategy(c.model_size_gb, gpu_count, c.gpu_memory_gb)
        return best.tensor_parallel_size, best.pipeline_parallel_size, best.data_parallel_size


def model_of_size(size_gb: float) -> ModelShape:
    """A dense model with Llama 3's shape whose bf16 weights take `size_gb` GB: the Llama 3 width nearest it in
    parameters, with as many layers as make up the size (at least one)."""
    if not size_gb > 0:
        raise InvalidInput(f"model_size_gb must be > 0, got {size_gb}")
    params = size_gb * GIB / DTYPE_BYTES["bf16"]

    def per_layer(hidden: int, heads: int, mlp: int) -> int:
        return hidden * HEAD_DIM * (2 * heads + 2 * KV_HEADS) + 3 * hidden * mlp + 2 * hidden

    def native_params(width: tuple[int, int, int, int]) -> float:
        hidden, heads, mlp, layers = width
        return layers * per_layer(hidden, heads, mlp) + 2 * VOCAB * hidden

    hidden, heads, mlp, _ = min(LLAMA3_WIDTHS, key=lambda w: abs(math.log(params / native_params(w))))
    layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / per_layer(hidden, heads, mlp)))
    config = ModelConfig(
        architecture="llama",
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
    )
    return ModelShape.of(config, f"a {size_gb:g} GB model")
