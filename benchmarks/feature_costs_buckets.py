"""Which engine feature a profiled function's time belongs to, for `sagellm bench feature-costs`.

A function's own time (cProfile's tottime) goes to the bucket of the source file it is defined in: one bucket per
engine feature (guided decoding, penalties, LoRA, ...) and a few coarse ones for the rest of a step. Every module of
runtime/engine and backends is placed here by name (a test checks that none falls through), so a new module is a
conscious choice of bucket rather than a silent share of "other". Functions outside the project (torch's Python,
the C builtins, numpy) are charged to the buckets of the project functions that called them, in proportion to the
time spent under each caller: a `torch.argmax` the sampler calls is the sampler's, a native kernel's is the model's.
"""

from __future__ import annotations

import functools
import pstats
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import sagellm.runtime.engine

ROOT = Path(sagellm.runtime.engine.__file__).resolve().parents[2]  # the checkout: runtime/, backends/, benchmarks/

GUIDED, PENALTIES, LORA, SPECULATION = "guided decoding", "penalties", "LoRA", "speculation"
STATE_SLOTS, PROMPT_LOGPROBS, THINKING = "state slots", "prompt logprobs", "thinking"
KV_EVENTS_TIERS, KV_HANDOVER, MULTIMODAL, STEP_TRACE = (
    "KV events/tiers",
    "KV hand-over (PD)",
    "multimodal",
    "step trace",
)
FEATURES = (GUIDED, PENALTIES, LORA, SPECULATION, STATE_SLOTS, PROMPT_LOGPROBS, THINKING, KV_EVENTS_TIERS)
FEATURES += (KV_HANDOVER, MULTIMODAL, STEP_TRACE)

MODEL, SAMPLER, SCHEDULER, BLOCKS = "model forward", "sampler", "scheduler", "block manager"
OUTPUTS, LOOP, OTHER = "detokenizer/output processing", "engine loop and intake", "other"
COARSE = (MODEL, SAMPLER, SCHEDULER, BLOCKS, OUTPUTS, LOOP, OTHER)
BUCKETS = FEATURES + COARSE

# Path prefixes relative to ROOT; the longest that matches wins. Folders end with "/".
RULES: Mapping[str, str] = {
    # runtime/engine, module by module
    "runtime/engine/grammar.py": GUIDED,
    "runtime/engine/guided_masks.py": GUIDED,
    "runtime/engine/guided_params.py": GUIDED,
    "runtime/engine/penalties.py": PENALTIES,
    "runtime/engine/lora_digest.py": LORA,
    "runtime/engine/lora_request.py": LORA,
    "runtime/engine/lora_slots.py": LORA,
    "runtime/engine/lora_weights.py": LORA,
    "runtime/engine/speculative/": SPECULATION,
    "runtime/engine/state_slots.py": STATE_SLOTS,
    "runtime/engine/state_cache.py": STATE_SLOTS,
    "runtime/engine/prompt_logprobs.py": PROMPT_LOGPROBS,
    "runtime/engine/thinking.py": THINKING,
    "runtime/engine/block_events.py": KV_EVENTS_TIERS,
    "runtime/engine/kv_events/": KV_EVENTS_TIERS,
    "runtime/engine/kv_tiers/": KV_EVENTS_TIERS,
    "runtime/engine/peer_prefix.py": KV_EVENTS_TIERS,  # a prompt's prefix fetched from a peer into the tiers
    "runtime/engine/kv_handover.py": KV_HANDOVER,
    "runtime/engine/media_spans.py": MULTIMODAL,
    "runtime/engine/step_trace.py": STEP_TRACE,
    "runtime/engine/model_runner.py": MODEL,
    "runtime/engine/runner_over_model.py": MODEL,
    "runtime/engine/kv_cache.py": MODEL,
    "runtime/engine/kv_prefault.py": MODEL,  # maps the KV cache's pages ahead of the blocks the model writes
    "runtime/engine/cache_geometry.py": MODEL,
    "runtime/engine/thread_governor.py": MODEL,  # the runner fits its threads to the cores before each forward
    "runtime/engine/placement.py": MODEL,
    "runtime/engine/sampler.py": SAMPLER,
    "runtime/engine/sampling_params.py": SAMPLER,
    "runtime/engine/scheduler.py": SCHEDULER,
    "runtime/engine/admission_gates.py": SCHEDULER,
    "runtime/engine/long_prefills.py": SCHEDULER,
    "runtime/engine/request_queue.py": SCHEDULER,
    "runtime/engine/priority_classes.py": SCHEDULER,
    "runtime/engine/yielding.py": SCHEDULER,
    "runtime/engine/sequence.py": SCHEDULER,
    "runtime/engine/kv_budget.py": SCHEDULER,
    "runtime/engine/block_manager.py": BLOCKS,
    "runtime/engine/prefix_hash.py": BLOCKS,
    "runtime/engine/window_blocks.py": BLOCKS,
    "runtime/engine/detokenizer.py": OUTPUTS,
    "runtime/engine/output_processor.py": OUTPUTS,
    "runtime/engine/outputs.py": OUTPUTS,
    "runtime/engine/llm_engine.py": LOOP,
    "runtime/engine/request_intake.py": LOOP,
    "runtime/engine/request_state.py": LOOP,
    "runtime/engine/request_limits.py": LOOP,
    "runtime/engine/prompt.py": LOOP,
    "runtime/engine/engine_builder.py": OTHER,  # start-up only
    "runtime/engine/config.py": OTHER,
    "runtime/engine/memory_report.py": OTHER,
    "runtime/engine/__init__.py": OTHER,
    # the model's code: backends, the execution graph, the model definitions
    "backends/": MODEL,
    "backends/native/lora.py": LORA,
    "backends/torch_ops/lora.py": LORA,
    "backends/triton_kernels/lora.py": LORA,
    "runtime/execution_graph/": MODEL,
    "runtime/execution_graph/lora_linear.py": LORA,
    "runtime/models/": MODEL,
    "runtime/models/lora_adapter.py": LORA,
    "runtime/models/mtp_head.py": SPECULATION,
    "runtime/models/tokenizer.py": OUTPUTS,
    "runtime/multimodal/": MULTIMODAL,
}


@dataclass(frozen=True)
class Bucket:
    """One bucket's own time over the profiled steps."""

    name: str
    kind: str  # "feature" or "engine"
    seconds: float
    top: list[tuple[str, float]] = field(default_factory=list)  # the functions (labels) that took most, seconds


def bucket_of_path(path: str | Path) -> str | None:
    """The bucket of a project source file by its longest matching rule; None outside the project or the rules."""
    relative = _project_path(str(path))
    if relative is None:
        return None
    matches = [p for p in RULES if relative == p or (p.endswith("/") and relative.startswith(p))]
    return RULES[max(matches, key=len)] if matches else None


@functools.cache
def _project_path(path: str) -> str | None:
    """`path` relative to ROOT; None for a file elsewhere (an installed package's too), or a builtin's ("~") or a
    frozen module's name."""
    if not Path(path).is_absolute() or "site-packages" in Path(path).parts:  # a virtualenv may sit in the checkout
        return None
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except (ValueError, OSError):
        return None


FunctionKey = tuple[str, int, str]  # pstats' (file, line, name)


class _Attribution:
    """Each profiled function's share per bucket: its own file's, or (outside the project) its callers' shares
    weighted by the time spent in it under each caller."""

    def __init__(self, stats: Mapping[FunctionKey, tuple]) -> None:
        self.stats = stats
        self._shares: dict[FunctionKey, dict[str, float]] = {}
        self._visiting: set[FunctionKey] = set()

    def shares(self, key: FunctionKey) -> dict[str, float]:
        if key in self._shares:
            return self._shares[key]
        own = _project_path(key[0]) is not None
        result = {bucket_of_path(key[0]) or OTHER: 1.0} if own else self._from_callers(key)
        self._shares[key] = result
        return result

    def _from_callers(self, key: FunctionKey) -> dict[str, float]:
        if key in self._visiting:  # a cycle among outside functions: it is charged through its other callers
            return {}
        self._visiting.add(key)
        callers = self.stats[key][4] if key in self.stats else {}
        weights: dict[str, float] = defaultdict(float)
        for caller, (_calls, _primitive, _own, cumulative) in callers.items():
            for bucket, share in self.shares(caller).items():
                weights[bucket] += share * max(cumulative, 1e-12)
        self._visiting.discard(key)
        total = sum(weights.values())
        return {bucket: weight / total for bucket, weight in weights.items()} if total else {OTHER: 1.0}


def attribute(stats: pstats.Stats, top: int = 3) -> list[Bucket]:
    """Every bucket's own time in `stats`, in BUCKETS order (they add up to the profile's total own time), each with
    the `top` functions that took most of it."""
    raw: Mapping[FunctionKey, tuple] = stats.stats  # type: ignore[attr-defined]
    attribution = _Attribution(raw)
    seconds: dict[str, dict[str, float]] = {name: defaultdict(float) for name in BUCKETS}
    for key, (_primitive, _calls, own, _cumulative, _callers) in raw.items():
        for bucket, share in attribution.shares(key).items():
            seconds[bucket][_label(key)] += own * share
    return [
        Bucket(name, "feature" if name in FEATURES else "engine", sum(by_function.values()),
               sorted(by_function.items(), key=lambda item: -item[1])[:top])
        for name, by_function in seconds.items()
    ]  # fmt: skip


def _label(key: FunctionKey) -> str:
    """A function as a reader finds it: `runtime/engine/sampler.py:40(sample)`, or a builtin's own name."""
    relative = _project_path(key[0])
    return f"{relative}:{key[1]}({key[2]})" if relative else pstats.func_std_string(key)


def unplaced_modules() -> list[str]:
    """The modules of runtime/engine and backends that no rule places (a new one needs a bucket)."""
    files = [*(ROOT / "runtime" / "engine").rglob("*.py"), *(ROOT / "backends").rglob("*.py")]
    return sorted(str(f.relative_to(ROOT)) for f in files if bucket_of_path(f) is None)
