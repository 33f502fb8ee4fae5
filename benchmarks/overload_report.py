"""What the overload benchmark says: a markdown table, one row per measure of each scenario and a column per server,
and a chart of the numbers a person would rather see than read: the tokens generated for clients that had left, the
time to a refusal, and the metastable test's goodput over time against capacity and what was wasted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SERVER_NAMES = {"sagellm": "sageLLM", "vllm": "vLLM-CPU"}
Results = dict[str, dict[str, dict[str, Any]]]  # server -> scenario -> what it measured


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _s(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.1f} s"


def _span(low: float, high: float) -> str:
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def _tally(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ×{count:,}" for name, count in counts.items()) or "none"


def _abandoned(r: dict[str, Any], a: dict[str, Any]) -> list[tuple[str, str]]:
    gone = "" if not r["abandoned_with_a_token"] else f" ({r['abandoned_with_a_token']} got a token before leaving)"
    idle = f"{r['idle_s']:.1f} s" if r["idle_s"] is not None else f"not idle in {a['idle_timeout_s']:.0f} s"
    return [
        (f"tokens generated for the {r['abandoned']} that left", f"{r['abandoned_tokens']:,.0f}{gone}"),
        ("last client gone → engine idle", idle),
    ]


def _late_refusals(r: dict[str, Any], a: dict[str, Any]) -> list[tuple[str, str]]:
    admitted = r["status"].get("200", 0)
    tokens = f"; {r['first_token']} of them got a token within {r['timeout_s']:.0f} s" if admitted else ""
    retry = f"; Retry-After {_span(r['retry_after_s'][0], r['retry_after_s'][2])} s" if r["retry_after_s"] else ""
    return [
        (f"answers to the {r['extra']} more", f"{_tally(r['status'])}{tokens}{retry}"),
        ("status line p50 / p99", f"{_ms(r['status_p50_ms'])} / {_ms(r['status_p99_ms'])} ms"),
    ]


def _refused_batch(r: dict[str, Any], a: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for batch in r["batches"]:
        if batch["answer_s"] is not None:
            answer = f"{batch['status']} ({batch['end']}) in {batch['answer_s']:.2f} s"
        else:
            answer = f"{batch['status'] or 'no'} status, no answer in {batch['timeout_s']:.0f} s (the client left)"
        ran = f"; {batch['prompts_ran']:,.0f} of its prompts ran"
        rows.append((f"{batch['prompts']:,} prompts: answer, prompts that ran", answer + ran))
    return rows


def _metastable(r: dict[str, Any], a: dict[str, Any]) -> list[tuple[str, str]]:
    refused = "none"
    if r["refusals"]:
        refused = f"{_tally(r['refusal_status'])}, p99 {_ms(r['refusal_p99_ms'])} ms"
        refused += f" (Retry-After median {r['retry_after_s'][1]:.0f} s)" if r["retry_after_s"] else ""
    shares = []  # a capacity window in which no request finished has no share to give
    if r["goodput_apart_pct"] is not None:
        shares.append(f"**{r['goodput_apart_pct']:.0f}%** of capacity started apart")
    if r["goodput_pct"] is not None:
        shares.append(f"{r['goodput_pct']:.0f}% of in step")
    pct = f" = {', '.join(shares)}" if shares else ""
    wasted = f"**{r['wasted_pct']:.0f}%** of {r['generated']:,.0f}" if r["wasted_pct"] is not None else "–"
    return [
        (f"capacity ({r['capacity_clients']} clients, closed loop): started together, in step",
         f"{r['capacity_req_s']:.2f} req/s, {r['capacity_tok_s']:.0f} tok/s; e2e p50 {_s(r['capacity_e2e_p50_ms'])}"),
        ("capacity: the clients started apart (requests as arrivals come; the steady window)",
         f"{r['apart_req_s']:.2f} req/s, {r['apart_tok_s']:.0f} tok/s"),
        (f"goodput at {a['overload_factor']:g}× capacity's request rate",
         f"{r['goodput_tok_s']:.0f} tok/s{pct} ({r['arrival_rate']:.1f} arrivals/s)"),
        ("wasted: generated, no waiting client got it", wasted),
        ("refusals, time to the refusal", refused),
        ("CPU seconds used in the overload: server / load generator (of all the machine had)",
         f"{r['server_cpu_s']:.0f} / {r['client_cpu_s']:.0f} (of {r['cpus'] * r['wall_s']:.0f})"),
        ("clients served (attempts, timeouts)",
         f"{r['clients_served']:,}/{r['clients']:,} ({r['attempts']:,} attempts, {r['timeouts']:,} timed out)"),
    ]  # fmt: skip


MEASURES = {"abandoned": _abandoned, "late-refusals": _late_refusals, "refused-batch": _refused_batch}
MEASURES["metastable"] = _metastable


def titles(a: dict[str, Any]) -> dict[str, str]:
    """Each scenario's row title, with the sizes it ran at."""
    small = f"engine of {a['small_seqs']}"
    return {
        "abandoned": f"1. abandoned queued streams ({small}: {a['small_seqs']} long streams, {a['abandoned']} more "
        "whose clients leave after {:g} s without a token, then the long ones leave)".format(a["abandon_after_s"]),
        "late-refusals": f"2. late refusals ({small}; {a['small_queue']} long streams fill our admission bound of "
        f"{a['small_queue']}; {a['extra']} more at once)",
        "refused-batch": f"3. one request of many prompts ({a['batch_prompts'].replace(',', ', then ')}) while "
        f"{a['small_seqs']} long streams run",
        "metastable": f"4. metastable: {a['overload_factor']:g}× capacity for {a['overload_s']:.0f} s, Poisson "
        f"arrivals, clients time out at {a['client_timeout_s']:g} s and retry (engine of {a['batch_seqs']}; our "
        f"admission bound {a['batch_queue']}"
        + (f", adapting to a {a['batch_ttft_slo_ms']:g} ms TTFT" if a["batch_ttft_slo_ms"] else "")
        + ")",
    }


def markdown(results: Results, options: dict[str, Any]) -> str:
    servers = list(results)
    lines = ["| scenario | measure | " + " | ".join(SERVER_NAMES.get(s, s) for s in servers) + " |"]
    lines.append("|---|---|" + "---|" * len(servers))
    for scenario, title in titles(options).items():
        measured = [results[s].get(scenario) for s in servers]
        if not any(measured):
            continue
        rows = [MEASURES[scenario](m, options) if m else [] for m in measured]
        for i, (measure, _) in enumerate(next(r for r in rows if r)):
            cells = [row[i][1] if row else "not run" for row in rows]
            lines.append(f"| {title if i == 0 else ''} | {measure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Results, options: dict[str, Any], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = list(results)
    names = [SERVER_NAMES.get(s, s) for s in servers]
    colors = [f"C{i}" for i in range(len(servers))]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), width_ratios=(1, 1, 2.2, 1.3))

    def bars(ax: Any, scenario: str, key: str, title: str) -> None:
        values = [(results[s].get(scenario) or {}).get(key) or 0.0 for s in servers]
        drawn = ax.bar(names, values, color=colors)
        ax.bar_label(drawn, fmt="%.0f", fontsize=8, padding=2)
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.2)

    bars(
        axes[0],
        "abandoned",
        "abandoned_tokens",
        f"1. tokens generated for the\n{options['abandoned']} clients that had left",
    )
    extra = options["extra"]
    bars(
        axes[1],
        "late-refusals",
        "status_p99_ms",
        f"2. ms to the status line, p99,\nof {extra} sent with the bound full",
    )
    ax = axes[2]
    for server, name, color in zip(servers, names, colors):
        run = results[server].get("metastable")
        if run:
            xs = [5 * i + 2.5 for i in range(len(run["timeline_tok_s"]))]
            ax.plot(xs, run["timeline_tok_s"], color=color, marker="o", markersize=3, label=f"{name} goodput")
            for key, style, kind in (("capacity_tok_s", "--", "in step"), ("apart_tok_s", "-.", "apart")):
                ax.axhline(run[key], color=color, linestyle=style, linewidth=1, label=f"{name} capacity {kind}")
    ax.set_title(f"4. tokens/s of requests completed within {options['client_timeout_s']:g} s, "
                 f"at {options['overload_factor']:g}× capacity", fontsize=9)  # fmt: skip
    ax.set_xlabel("seconds into the overload")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    running = ax.twinx()  # what the engine was doing meanwhile
    for server, name, color in zip(servers, names, colors):
        state = (results[server].get("metastable") or {}).get("server_state") or []
        ts = [sample["t"] for sample in state]
        running.plot(ts, [sample.get("num_requests_running", 0) for sample in state], color=color, linestyle=":",
                     linewidth=1, label=f"{name} running requests")  # fmt: skip
    running.set_ylabel("requests running in the engine (dotted)", fontsize=8)
    running.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax = axes[3]
    width = 0.8 / max(len(servers), 1)
    for i, (server, name, color) in enumerate(zip(servers, names, colors)):
        run = results[server].get("metastable") or {}
        values = [run.get(key) or 0.0 for key in ("goodput_apart_pct", "goodput_pct", "wasted_pct")]
        drawn = ax.bar(
            [x + (i - (len(servers) - 1) / 2) * width for x in range(3)], values, width, color=color, label=name
        )
        ax.bar_label(drawn, fmt="%.0f%%", fontsize=8, padding=2)
    labels = ["goodput, % of\ncapacity apart", "goodput, % of\ncapacity in step", "wasted\n% of generated"]
    ax.set_xticks(range(3), labels, fontsize=8)
    ax.set_title("4. metastable test", fontsize=9)
    ax.legend(fontsize=7)
    ax.margins(y=0.2)
    model = Path(options["model"]).name if options.get("model") else "SmolLM2-135M-Instruct"
    fig.suptitle(f"sagellm bench overload: {model}, the same client against each server", fontsize=10)
    fig.text(0.5, 0.01, cpu[:180], ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
