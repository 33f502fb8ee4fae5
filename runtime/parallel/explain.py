"""The planner's reasons in plain English: what the model needs, what the recommended split does with the devices and
why a smaller one would not do; or, when nothing fits, how much memory the model needs."""

from __future__ import annotations

from sagellm.runtime.parallel.devices import Devices, gib
from sagellm.runtime.parallel.model_shape import DTYPE_BYTES, GIB, ModelShape
from sagellm.runtime.parallel.plan import Alternative


def explain(
    shape: ModelShape,
    devices: Devices,
    ranked: list[Alternative],
    dtype: str,
    tokens: int,
    weight_bytes: float | None = None,
) -> str:
    """Why the best-ranked split is recommended; or, when it does not fit, that nothing does and what would help.
    `weight_bytes`: per parameter, where the weights are held otherwise than in `dtype` (a GGUF's blocks)."""
    needs = _needs(shape, dtype, tokens, weight_bytes)
    if not ranked[0].fits:
        return _too_big(needs, devices, ranked)
    return _recommended(needs, shape, devices, ranked, tokens)


def _recommended(needs: str, shape: ModelShape, devices: Devices, ranked: list[Alternative], tokens: int) -> str:
    choice = ranked[0]
    split = choice.config
    parts = [
        needs,
        f"Devices: {devices.describe()}.",
        f"Recommended {split}: {'; '.join(_what_it_does(shape, devices, choice))}.",
        f"Each device holds {gib(choice.weights_gib)} GiB of weights and {gib(choice.kv_gib)} GiB of KV cache "
        f"for {tokens} tokens; the weights fill {choice.weights_gib / choice.usable_gib:.0%} of its usable "
        f"{gib(choice.usable_gib)} GiB, leaving {gib(choice.usable_gib - choice.weights_gib)} GiB to the KV cache.",
    ]
    smaller = _next_smaller(ranked, split.replica_size)
    if smaller is not None:
        verdict = (
            f"would need {gib(smaller.total_gib)} GiB per device and does not fit"
            if not smaller.fits
            else f"fits, but its weights fill {smaller.weights_gib / smaller.usable_gib:.0%} of usable memory, "
            f"leaving the KV cache {gib(smaller.usable_gib - smaller.weights_gib)} GiB"
        )
        parts.append(f"A smaller split per replica, {smaller.config}, {verdict}.")
    return " ".join(parts)


def _too_big(needs: str, devices: Devices, ranked: list[Alternative]) -> str:
    closest = min(ranked, key=lambda a: a.total_gib)
    return (
        f"{needs} No split over {devices.describe()} holds it: the leanest, {closest.config}, "
        f"still needs {gib(closest.total_gib)} GiB per device ({gib(closest.weights_gib)} weights + "
        f"{gib(closest.kv_gib)} KV). Add devices, use a smaller dtype, or hold fewer KV tokens (max_model_len)."
    )


def _needs(shape: ModelShape, dtype: str, tokens: int, weight_bytes: float | None) -> str:
    bytes_per = DTYPE_BYTES[dtype]
    params = shape.num_params()
    active = ""
    if shape.is_moe:
        inactive = (shape.num_experts - shape.experts_per_token) * shape.expert_params * shape.config.num_layers
        active = f" ({_count(params - inactive)} active per token: {shape.experts_per_token} of "
        active += f"{shape.num_experts} experts)"
    weights = params * (weight_bytes or bytes_per) / GIB
    held = f"as stored ({8 * weight_bytes:.2f} bits a parameter)" if weight_bytes else f"in {dtype}"
    kv = shape.kv_bytes_per_token(bytes_per) * tokens / GIB
    return (
        f"{shape.label} has {_count(params)} parameters{active}: {gib(weights)} GiB of weights {held}, "
        f"and {gib(kv)} GiB of KV cache for {tokens} tokens; {gib(weights + kv)} GiB in all."
    )


def _what_it_does(shape: ModelShape, devices: Devices, choice: Alternative) -> list[str]:
    split, config = choice.config, shape.config
    does = []
    if split.tp == 1 and split.pp == 1:
        does.append("each device runs every layer's attention whole" if split.ep > 1 else "one device holds it all")
    if split.tp > 1:
        heads = f"{shape.kv_groups_per_rank(split.tp)} of the {config.num_kv_heads} KV heads on each"
        does.append(f"tensor parallel over {split.tp} devices inside one fast-link group, {heads}")
    if split.pp > 1:
        across = " across fast-link groups" if split.replica_size > devices.group_size else ""
        does.append(f"{split.pp} pipeline stages of up to {shape.layers_per_stage(split.pp)} layers{across}")
    if split.ep > 1:
        each = shape.num_experts // split.ep
        does.append(f"experts spread over {split.ep} ranks, {each} whole expert{'s' if each > 1 else ''} on each")
    if split.dp > 1:
        does.append(f"{split.dp} replicas (data parallel) serve requests side by side")
    return does


def _next_smaller(ranked: list[Alternative], size: int) -> Alternative | None:
    """The best-ranked split with the next fewer devices per replica than the choice."""
    smaller = [a for a in ranked if a.config.replica_size < size]
    if not smaller:
        return None
    biggest = max(a.config.replica_size for a in smaller)
    return next(a for a in smaller if a.config.replica_size == biggest)


def _count(params: int) -> str:
    """70553706496 -> "70.6B", 134515008 -> "135M"."""
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
