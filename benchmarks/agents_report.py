"""The coding-agent benchmark's numbers: each arm's turns summarized by phase (first turns, returning turns before the
restart, returning turns after it), the markdown tables, and the PNG chart; and the W1 overhead check's table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sagellm.benchmarks.agents_load import PHASES, Turn, Workload

AFTER = "first after restart"  # the turns right after the restart: the disk tier's case, on its own
LABELS = {PHASES[0]: "first turns", PHASES[1]: "returning, before restart", PHASES[2]: "returning, after restart",
          AFTER: "first turn after restart"}  # fmt: skip


def summarize(turns: list[Turn], workload: Workload) -> dict[str, dict[str, Any]]:
    """Per phase (and the first turn after the restart on its own): turns, failures, TTFT p50/p99 in ms, mean prompt
    tokens and mean cached tokens (None where the server reported none)."""
    groups = {phase: [t for t in turns if t.phase == phase] for phase in PHASES}
    if workload.restart_after:
        groups[AFTER] = [t for t in turns if t.turn == workload.restart_after + 1]
    return {name: _phase(group) for name, group in groups.items() if group}


def _phase(turns: list[Turn]) -> dict[str, Any]:
    ok = [t for t in turns if t.error is None and t.ttft_s is not None]
    ttfts = [1000 * t.ttft_s for t in ok]
    cached = [t.cached_tokens for t in ok if t.cached_tokens is not None]
    prompts = [t.prompt_tokens for t in ok if t.prompt_tokens is not None]
    tiers: dict[str, int] = {}
    for t in ok:
        for tier, count in (t.cached_by_tier or {}).items():
            tiers[tier] = tiers.get(tier, 0) + count
    return {
        "turns": len(turns),
        "failed": len(turns) - len(ok),
        "ttft_p50_ms": float(np.percentile(ttfts, 50)) if ttfts else None,
        "ttft_p99_ms": float(np.percentile(ttfts, 99)) if ttfts else None,
        "prompt_tokens_mean": float(np.mean(prompts)) if prompts else None,
        "cached_tokens_mean": float(np.mean(cached)) if cached else None,
        "cached_by_tier_mean": {tier: count / len(ok) for tier, count in tiers.items()} or None,
    }


def markdown(arms: dict[str, dict[str, Any]]) -> str:
    """One row per arm that ran; arms skipped are listed under the table with the reason."""
    heads = ["arm", "first turns TTFT p50 / p99 ms", "returning, before restart", "returning, after restart",
             "first turn after restart", "cached tokens / returning turn (before; after)", "restart s",
             "failed"]  # fmt: skip
    rows = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    notes = []
    for name, arm in arms.items():
        if "skipped" in arm:
            notes.append(f"- {name}: not run: {arm['skipped']}")
            continue
        s = arm["summary"]
        failed = sum(p["failed"] for key, p in s.items() if key != AFTER)
        cached = f"{_cached(s.get(PHASES[1]))}; {_cached(s.get(PHASES[2]))}"
        restart = arm.get("restart_s")
        cells = [name, _ttft(s.get(PHASES[0])), _ttft(s.get(PHASES[1])), _ttft(s.get(PHASES[2])), _ttft(s.get(AFTER)),
                 cached, "–" if restart is None else f"{restart:.0f}", str(failed)]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows + ([""] + notes if notes else []))


def _ttft(phase: dict[str, Any] | None) -> str:
    if not phase or phase["ttft_p50_ms"] is None:
        return "–"
    return f"{phase['ttft_p50_ms']:.0f} / {phase['ttft_p99_ms']:.0f}"


def _cached(phase: dict[str, Any] | None) -> str:
    """Mean cached of mean prompt tokens, and sageLLM's split by tier."""
    if not phase or phase["cached_tokens_mean"] is None:
        return "–"
    text = f"{phase['cached_tokens_mean']:.0f} of {phase['prompt_tokens_mean']:.0f}"
    tiers = phase.get("cached_by_tier_mean")
    return text + (" (" + ", ".join(f"{k} {v:.0f}" for k, v in tiers.items()) + ")" if tiers else "")


def plot(arms: dict[str, dict[str, Any]], path: Path, title: str, cpu: str) -> None:
    """TTFT p50 per phase per arm (log scale: cold and cached differ by orders), and cached tokens per turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {name: arm["summary"] for name, arm in arms.items() if "summary" in arm}
    phases = [p for p in (*PHASES, AFTER) if any(p in s for s in ran.values())]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=(3, 2))
    bar = 0.8 / max(len(ran), 1)
    for i, (name, summary) in enumerate(ran.items()):
        xs = [x + (i - (len(ran) - 1) / 2) * bar for x in range(len(phases))]
        ttft = [(summary.get(p) or {}).get("ttft_p50_ms") or 0.0 for p in phases]
        bars = left.bar(xs, ttft, bar, label=name, color=f"C{i}")
        left.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        cached = [(summary.get(p) or {}).get("cached_tokens_mean") or 0.0 for p in PHASES[1:]]
        xs = [x + (i - (len(ran) - 1) / 2) * bar for x in range(len(PHASES) - 1)]
        right.bar_label(right.bar(xs, cached, bar, label=name, color=f"C{i}"), fmt="%.0f", fontsize=7, padding=2)
    left.set_yscale("log")
    left.set_xticks(range(len(phases)), [LABELS[p] for p in phases], fontsize=8)
    left.set_title("TTFT p50, ms (log scale; lower is better)", fontsize=10)
    right.set_xticks(range(len(PHASES) - 1), [LABELS[p] for p in PHASES[1:]], fontsize=8)
    right.set_title("cached prompt tokens per returning turn (mean)", fontsize=10)
    if ran:
        left.legend(fontsize=8)
    figure.suptitle(f"{title}\n{cpu[:110]}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def overhead_markdown(medians: dict[str, dict[str, float]], overhead_pct: float, ttft_ratio: float) -> str:
    rows = ["| server | out tok/s | TTFT p50 ms | TPOT p50 ms |", "|---|---|---|---|"]
    for name, m in medians.items():
        rows.append(f"| {name} | {m['out_tok_s']:.1f} | {m['ttft_p50_ms']:.0f} | {m['tpot_p50_ms']:.1f} |")
    rows.append(f"\noverhead of the tiers: {overhead_pct:.1f}% of output tok/s; TTFT p50 ratio {ttft_ratio:.3f}")
    return "\n".join(rows)


def overhead_plot(medians: dict[str, dict[str, float]], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 4))
    colors = [f"C{i}" for i in range(len(medians))]
    left.bar_label(left.bar(list(medians), [m["out_tok_s"] for m in medians.values()], color=colors), fmt="%.1f")
    left.set_title("W1-c16 output tok/s")
    right.bar_label(right.bar(list(medians), [m["ttft_p50_ms"] for m in medians.values()], color=colors), fmt="%.0f")
    right.set_title("W1-c16 TTFT p50 ms")
    figure.suptitle(f"the KV tiers' overhead on W1-c16; {cpu[:90]}", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
