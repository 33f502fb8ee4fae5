"""W6's output: the rich tables, the JSON and the PNG chart of `sagellm bench policies`. Every number shown is the
median over repeats of a policy's runs (request counts summed, see `policy_workload.median_run`); the JSON keeps
each repeat's own numbers beside the medians. The runs come from `policies` (real engine) and `policy_sim`."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from sagellm.benchmarks.policy_workload import CLASSES, Part

DEFINITIONS = {
    "attainment": "requests of the class whose first token came within its TTFT SLO / all requests of the class",
    "shed": "requests that ended without a first token (shed by the bounded queue by the policy's order)",
    "max_queue": "policy_sort max_len = queue_s x measured capacity (None: unbounded)",
    "capacity_rps": "real: closed-loop completed requests/s at 2 x max_num_seqs in flight, from the "
    "max_num_seqs-th finish on; sim: requests/s of every instance with every slot busy, from its tier's step model "
    "and the trace's lengths (sagellm.simulator.capacity)",
    "sim_service": "the cluster simulator: each tier's step model (policy_sim.rates_tier) gives a decode step, every "
    "running sequence one token, 1 / decode tokens/s, and a prompt token 1 / prefill tokens/s in the same step; "
    "requests routed to an instance wait in its engine queue for a slot",
    "wall_s": "wall-clock seconds of a run on this machine: real, the replay; sim, the simulation",
    "repeats": "each repeat is a fresh trace (seed + repeat) through every policy in turn; a result's numbers are "
    "medians over its runs (capacity, arrivals and queue bound: over the traces), requests / met / shed and the "
    "counts of errors and engine SLO verdicts are sums; 'runs' holds every repeat's own numbers",
}
FLAGS = ("parts", "policies", "model", "requests", "capacity_requests", "prompt_len", "output_len", "max_num_seqs")
FLAGS += ("threads", "sim_instances", "sim_requests", "load", "queue_seconds", "real_queue_seconds", "seed", "repeats")


def report_json(parts: list[Part], machine: dict[str, object], command: str, elapsed_s: float) -> dict[str, Any]:
    """Every number, NaN (a class nothing was measured for) stored as null."""
    classes = [vars(c) for c in CLASSES]
    head = {"benchmark": "W6 scheduling under overload", "classes": classes, "machine": machine}
    body = {part.name: part.to_json() for part in parts}
    return _finite(head | body | {"definitions": DEFINITIONS, "command": command, "elapsed_s": elapsed_s})


def print_tables(parts: list[Part], machine: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    for part in parts:
        heads = [f"{c.name} ({c.ttft_slo_ms / 1000:g} s)" for c in CLASSES]
        table = Table("policy", *heads, "overall", "shed", "TTFT p50 high ms", title=_title(part))
        sim = part.name == "sim"
        if sim:
            table.add_column("wall s")
        for row in part.medians():
            classes, st = row["classes"], row["stats"]
            cells = [_fmt(classes[c.name]["attainment"], "{:.0%}") for c in CLASSES]
            shed = sum(c["shed"] for c in classes.values())
            cells += [_fmt(row["overall"], "{:.1%}"), str(shed), _fmt(classes["high"]["ttft_p50_ms"], "{:.0f}")]
            if sim:
                cells.append(_fmt(st["wall_s"], "{:.1f}"))
            table.add_row(_label(row), *cells)
        table.caption = _caption(part, machine)
        console.print(table)


def _label(row: dict[str, Any]) -> str:
    """adaptive with its switches (median) and the mode it ended in (the commonest over repeats, and how often)."""
    stats = row["stats"]
    if "adaptive_switches" not in stats:
        return row["policy"]
    finals = Counter(run["stats"]["adaptive_final"] for run in row["runs"])
    mode, n = finals.most_common(1)[0]
    where = f"ended as {mode}" + (f" in {n} of {len(row['runs'])} runs" if n < len(row["runs"]) else "")
    return f"{row['policy']} ({stats['adaptive_switches']:g} switches, {where})"


def _fmt(value: float | None, spec: str = "{:.0f}") -> str:
    return "–" if value is None else spec.format(value)


def _repeats(part: Part) -> str:
    seeds = [t["seed"] for t in part.traces]
    if len(seeds) == 1:
        return f"one run (seed {seeds[0]})"
    return f"median of {len(seeds)} repeats (seeds {seeds[0]}-{seeds[-1]}, policies interleaved), shed summed"


def _title(part: Part) -> str:
    c, t = part.config, part.trace_medians()
    bound = f"{t['max_queue']:.0f}" if t["max_queue"] is not None else "unbounded"
    if part.name == "real":
        what = f"real engine, {Path(c['model']).name}, max_num_seqs {c['max_num_seqs']}, {c['requests']} requests"
    else:
        what = f"simulator, {c['instances']} instances, {t['counted_requests']:.0f} of {c['requests']} requests counted"
    return (
        f"W6 {what}: capacity {t['capacity_rps']:.2f} req/s, arrivals {t['arrival_rps']:.2f} req/s "
        f"(Poisson), queue bound {bound}"
    )


def _caption(part: Part, machine: dict[str, object]) -> str:
    c, t = part.config, part.trace_medians()
    if part.name == "real":
        shape = f"{c['prompt_len']}-token prompts, {c['output_len']} output tokens (ignore_eos), fp32 weights"
        # policy_sort and route each hold one popped request while the engine is full (rendezvous channels), so
        # even a request the policy puts first waits for about three slot releases
        shape += f"; TTFT floor under load ≈ 3 / capacity = {3 / t['capacity_rps']:.2f} s"
    else:
        shape = f"log-normal prompts (median {c['prompt_median']}) and outputs (median {c['output_median']})"
        shape += f"; warm-up {t['warmup_s']:.1f} s of {t['duration_s']:.1f} s not counted"
    return f"{_repeats(part)}; {shape}; {machine['cpu']}, {machine['cores']} cores, shared machine"


def plot(parts: list[Part], path: Path) -> None:
    """One panel per part: for each policy, bars of attainment (median over repeats) per class and overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*(c.name for c in CLASSES), "overall"]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.6), squeeze=False)
    width = 0.8 / len(groups)
    for ax, part in zip(axes[0], parts):
        rows = part.medians()
        for g, group in enumerate(groups):
            values = [row["overall"] if group == "overall" else row["classes"][group]["attainment"] for row in rows]
            values = [math.nan if v is None else 100 * v for v in values]
            xs = [x + (g - (len(groups) - 1) / 2) * width for x in range(len(rows))]
            bars = ax.bar(xs, values, width, label=group, color="0.4" if group == "overall" else f"C{g}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(rows)), [row["policy"] for row in rows], fontsize=9)
        ax.set_ylim(0, 110)
        ax.set_ylabel("SLO attainment % (higher is better)")
        name = "real engine" if part.name == "real" else f"simulator, {part.config['instances']} instances"
        bound = f"queue bound {part.max_queue:.0f}" if part.max_queue is not None else "unbounded queue"
        ax.set_title(f"{name}: arrivals {part.arrival_rps / part.capacity_rps:.1f}× capacity, {bound}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(groups), fontsize=9)
    slos = ", ".join(f"{c.name} {c.ttft_slo_ms / 1000:g} s ({100 * c.share:.0f}%)" for c in CLASSES)
    repeats = len(parts[0].traces)
    runs = f"\nmedian of {repeats} repeats, each a fresh trace through every policy" if repeats > 1 else ""
    fig.suptitle(f"W6 scheduling under overload: TTFT SLOs {slos}{runs}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.91 if runs else 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command(args: argparse.Namespace) -> str:
    """The run spelled out with every option that changes what is measured, so its numbers can be reproduced."""
    parts = ["sagellm", "bench", "policies"]
    for flag in FLAGS:
        if getattr(args, flag) is not None:
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return " ".join(shlex.quote(p) for p in parts)


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric with nothing to measure (no request of a class served) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
