"""What a cluster simulation simulates (`ClusterConfig`): how many instances, alike (one `StepModel`) or in `Tier`s of
their own step model, price and role; the real scheduling policy (by name, or a control plane's policy object) and
routing strategy, by name; the autoscaler, pd_split's threshold, the KV hand-over between prefill and decode workers,
and how many instances share a host.
Every setting is checked here, so a bad one fails before a simulation starts, saying what to change."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sagellm.common.autoscale import AutoscaleSettings
from sagellm.common.errors import InvalidInput
from sagellm.operators.policies import POLICIES, is_policy
from sagellm.operators.routing import STRATEGIES
from sagellm.simulator.kv_transfer import KVTransferModel
from sagellm.simulator.step_model import StepModel

CONTENT_STRATEGIES = ("locality", "cache_aware")  # they read prompt contents, which the simulator does not model
ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class Tier:
    """A kind of instance in a heterogeneous cluster: its share of `ClusterConfig.instances`, its step model (speed and
    slots), its price, which its `InstanceStats` report (cost_optimized reads `price_per_1k_tokens`), and its role
    (colocated, or a prefill or decode worker)."""

    name: str
    share: float
    step_model: StepModel
    price_per_1k_tokens: float = 0.0
    role: str = "colocated"


@dataclass
class ClusterConfig:
    """`instances` alike of `step_model`, or split over `tiers` by their shares (exactly one of the two)."""

    instances: int
    step_model: StepModel | None = None
    tiers: tuple[Tier, ...] | None = None
    # a name from sagellm.operators.policies (the real PolicySort operator), or a control-plane `SchedulingPolicy`
    # object (sagellm.control_plane.policies), which then orders the simulated queue as it orders a gateway's
    policy: Any = "fifo"
    routing: str = "load_balanced"  # a name from sagellm.operators.routing (the real strategy classes)
    sample: int | None = None  # power-of-d choices: route chooses among d sampled free instances (None: all)
    max_queue: int | None = None  # policy_sort's max_len
    autoscale: AutoscaleSettings | None = None  # instances then starts at min_instances, at most max_instances
    startup_s: float = 30.0  # how long a new instance takes to become ready
    pd_threshold_tokens: int = 512  # pd_split's: prompts of at least this many tokens take the PD path
    kv_transfer: KVTransferModel = KVTransferModel()  # a prefill worker's first token to the decode worker's
    instances_per_host: int = 1  # instances i and j share a host when i // this == j // this: they slow each other
    seed: int = 0

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise InvalidInput(f"instances must be >= 1, got {self.instances}")
        if (self.step_model is None) == (self.tiers is None):
            raise InvalidInput(
                "give either step_model (alike instances) or tiers (kinds of instance), not both or none"
            )
        if self.tiers is not None:
            _check_tiers(self.tiers)
            if self.autoscale is not None:
                raise InvalidInput("autoscale adds instances of one kind: give step_model, not tiers")
        if not isinstance(self.policy, str):
            from sagellm.control_plane.policies import policy_name  # (the simulator runs without it otherwise)

            self.policy = policy_name(self.policy)
        if not is_policy(self.policy):
            raise InvalidInput(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.routing not in STRATEGIES or self.routing in CONTENT_STRATEGIES:
            names = [name for name in STRATEGIES if name not in CONTENT_STRATEGIES]
            why = " (it reads prompt contents, which the simulator does not model)" * (self.routing in STRATEGIES)
            raise InvalidInput(f"routing {self.routing!r} cannot be simulated{why}; choose from {', '.join(names)}")
        if self.sample is not None and self.sample < 1:
            raise InvalidInput(f"sample must be >= 1 instance, got {self.sample}")
        if self.max_queue is not None and self.max_queue < 1:
            raise InvalidInput(f"max_queue must be >= 1 or unset, got {self.max_queue}")
        if self.startup_s < 0:
            raise InvalidInput(f"startup_s must be >= 0, got {self.startup_s}")
        if self.instances_per_host < 1:
            raise InvalidInput(f"instances_per_host must be >= 1, got {self.instances_per_host}")
        if self.pd_threshold_tokens < 0:
            raise InvalidInput(f"pd_threshold_tokens must be >= 0, got {self.pd_threshold_tokens}")
        for tier, _ in self.kinds():
            model = tier.step_model
            if not 1 <= model.max_num_seqs <= model.max_num_batched_tokens:
                raise InvalidInput(
                    f"the step model's max_num_seqs ({model.max_num_seqs}) must be within 1..max_num_batched_tokens "
                    f"({model.max_num_batched_tokens}): every running sequence's decode token fits a step"
                )

    def kinds(self) -> list[tuple[Tier, int]]:
        """Each kind of instance and how many of it start: a tier's share of `instances` rounded (the last tier takes
        the rest); alike instances are one tier of them all (`min_instances` of them under autoscale)."""
        if self.tiers is None:
            assert self.step_model is not None
            start = self.autoscale.min_instances if self.autoscale else self.instances
            return [(Tier("", 1.0, self.step_model), start)]
        counts = [round(tier.share * self.instances) for tier in self.tiers[:-1]]
        return list(zip(self.tiers, [*counts, self.instances - sum(counts)]))


def _check_tiers(tiers: tuple[Tier, ...]) -> None:
    names = [tier.name for tier in tiers]
    if not tiers or len(set(names)) < len(names):
        raise InvalidInput(f"tiers need distinct names, at least one, got {names}")
    for tier in tiers:
        if tier.share < 0 or tier.price_per_1k_tokens < 0:
            raise InvalidInput(
                f"tier {tier.name!r}: share and price must be >= 0, got {tier.share}, {tier.price_per_1k_tokens}"
            )
        if tier.role not in ROLES:
            raise InvalidInput(f"tier {tier.name!r}: role must be one of {', '.join(ROLES)}, got {tier.role!r}")
    if all(tier.role == "prefill" for tier in tiers):
        raise InvalidInput("prefill instances alone cannot serve: add a decode (or colocated) tier")
    if not math.isclose(sum(tier.share for tier in tiers), 1.0):
        raise InvalidInput(f"tiers' shares must sum to 1, got {sum(tier.share for tier in tiers):g}")
