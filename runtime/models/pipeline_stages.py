"""Pipeline parallelism's split of a model: consecutive layers per stage, one stage per group of processes.

Stage 0 also holds the embedding and the last stage the final norm and the lm_head; between stages travel the two
tensors a layer boundary carries, the hidden state and the residual stream ([T, H] each), so a stage's graph is the
decoder graph over its layers (`build_decoder_graph(config, stage.layers(...))`) and nothing else changes."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.tensor_parallel import partition


@dataclass(frozen=True)
class PipelineStage:
    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"stage {self.index} is not one of {self.count} pipeline stages")

    def layers(self, num_layers: int) -> range:
        if num_layers < self.count:
            raise InvalidInput(f"pipeline parallel size {self.count} is more than the model's {num_layers} layers")
        return range(*partition(num_layers, self.count, self.index))

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1
