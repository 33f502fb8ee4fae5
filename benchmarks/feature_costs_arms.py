"""The engines `sagellm bench feature-costs` times beside the baseline: each with one feature armed (set up on the
engine) that none of the W1-c16 requests uses, so any step time it adds is what the feature costs the requests that
do not use it. Features that no engine setting arms (a request asks for them) are listed with why there is no such
engine: their cost to other requests is their row of the profile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm.benchmarks import feature_costs_buckets as buckets

if TYPE_CHECKING:  # the CLI imports this module to list its options: the engine loads only when it runs
    from sagellm.runtime.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class Arm:
    """An engine like the baseline but for `engine_args`, and `prepare(engine, work_dir)` run once it is loaded."""

    name: str
    feature: str  # its bucket in the profile
    setting: str  # what is armed, in words
    engine_args: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[LLMEngine, Path], None] | None = None


@dataclass(frozen=True)
class Unarmed:
    """A feature with no armed-but-unused engine to time, and why."""

    feature: str
    why: str


def _load_unused_adapter(engine: LLMEngine, work: Path) -> None:
    """A random rank-16 adapter on every projection read and loaded into the engine's slot, then released: the
    slot holds it, and no request names it."""
    from sagellm.benchmarks.lora import write_random_adapters
    from sagellm.runtime.engine.lora_request import LoRARequest

    assert engine.lora is not None, "the LoRA arm's engine has enable_lora"
    name, path = next(iter(write_random_adapters(str(engine.config.model), work / "adapters").items()))
    slot = engine.lora.acquire(engine.lora.adapter(LoRARequest(name, 1, str(path))))
    assert slot is not None, "an engine with a free slot loads the adapter"
    engine.lora.release(slot)


def _record_steps(engine: LLMEngine, work: Path) -> None:
    """What SAGELLM_STEP_TRACE puts on an engine node: every step timed and kept (written out every 512 steps)."""
    from sagellm.runtime.engine.step_trace import StepTimer

    StepTimer(engine).log = []


ARMS: dict[str, Arm] = {
    "lora": Arm(
        "lora",
        buckets.LORA,
        "enable_lora, one random rank-16 adapter loaded in its slot, named by no request",
        {"enable_lora": True, "max_loras": 1},
        _load_unused_adapter,
    ),
    "kv-tiers": Arm(
        "kv-tiers", buckets.KV_EVENTS_TIERS, "a 1 GiB RAM tier under the prefix cache", {"kv_offload_ram_gb": 1.0}
    ),
    "kv-events": Arm(
        "kv-events",
        buckets.KV_EVENTS_TIERS,
        "KV cache events published on ZeroMQ (tcp, port 0), no subscriber",
        {"kv_events_config": {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0"}},
    ),
    "step-trace": Arm(
        "step-trace",
        buckets.STEP_TRACE,
        "StepTimer around step(), steps kept (SAGELLM_STEP_TRACE's)",
        {},
        _record_steps,
    ),
}

UNARMED = (
    Unarmed(
        buckets.SPECULATION,
        "not timed: no request can go without it. With speculative_config every decoding request is proposed to "
        "(RequestState.may_speculate: only guided, budgeted-thinking and prefill-only requests are not), so an "
        "engine with it set would time speculation in use, not armed",
    ),
    Unarmed(buckets.GUIDED, "no engine setting: a request asks for it; its cost to others is its profile row"),
    Unarmed(buckets.PENALTIES, "no engine setting: a request asks for it; its cost to others is its profile row"),
    Unarmed(buckets.PROMPT_LOGPROBS, "no engine setting: a request asks for it; its cost to others is its profile row"),
    Unarmed(buckets.THINKING, "no engine setting: a request asks for it; its cost to others is its profile row"),
)


def state_slots_note(engine: LLMEngine) -> Unarmed | None:
    """State slots are armed by the model (recurrent layers), never by a setting: said so for a model without."""
    if engine.scheduler.state_slots is not None:
        return Unarmed(buckets.STATE_SLOTS, "this model's recurrent layers use them: every request does")
    return Unarmed(buckets.STATE_SLOTS, "this model has no recurrent layers: no engine of it arms state slots")


def chosen_arms(names: str) -> list[Arm]:
    """The arms of a comma list ("none" or "": only the baseline)."""
    from sagellm.common.errors import InvalidInput

    wanted = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in wanted if n not in ARMS]
    if unknown:
        raise InvalidInput(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)} or none")
    return [ARMS[n] for n in wanted]
