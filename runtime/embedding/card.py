"""What a pooling model is, as the routes need to know it: its vector's length (a classifier's: its labels), its
longest input, its task, its labels and the activation its scores go through. Read from the model's files without
its weights (`encoder.read_pooling_card`), so a gateway knows a model another process serves (an engine of its own,
an API server's core) as it knows one it serves itself; a msgspec Struct, so it crosses processes as it is."""

from __future__ import annotations

from typing import Literal

import msgspec

Task = Literal["embed", "classify"]
Activation = Literal["sigmoid", "softmax", "identity"]


class PoolingCard(msgspec.Struct, frozen=True, kw_only=True):
    dim: int  # length of the pooled vector (a classifier's: its labels)
    max_length: int  # longest input in tokens, special tokens included
    task: Task = "embed"  # "classify": a sequence classifier, whose output is its labels' logits
    labels: tuple[str, ...] = ()  # a classifier's labels, by index
    activation: Activation = "identity"  # what a classifier's scores go through (CrossEncoder.predict's)
