"""`sagellm bench fairness`: a trickle of short chats keeps its time to first token while one request brings
thousands of prompt tokens (issue 62: the long-prefill threshold, `--long-prefill-token-threshold`).

Against `sagellm serve` (SmolLM2-135M-Instruct by default), started by the benchmark once per configuration: a short
chat every ~0.5 s (~20-token messages, 16 tokens out, streamed), its TTFT p50 and p99 measured
1. quiet: the trickle alone;
2. echo: while one /v1/completions of 16 prompts of ~256 tokens with `echo` + `logprobs` (every prompt token scored,
   as lm-evaluation-harness asks) runs;
3. long: while one completion of a 6,000-token prompt runs.
Acceptance: the trickle's TTFT p99 under 3x its quiet value in both loaded cases (the exit status is 1 when the
first configuration misses it). The chats counted in a loaded case are those sent while its heavy request ran. A
markdown table on stdout with the CPU beside it; every number in `--out` (JSON). The machine's load average goes
with each case: on a shared machine the ratios, measured minutes apart, are what to read."""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.chaos_server import Server
from sagellm.benchmarks.fairness_load import Chat, echo_body, long_body, send_chat, send_heavy, trickle
from sagellm.benchmarks.overload_client import percentile_ms
from sagellm.benchmarks.overload_servers import served_model
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.errors import users_file

LOADED = ("echo", "long")  # the cases the acceptance reads
ACCEPTED_RATIO = 3.0  # a loaded case's TTFT p99 over the quiet one's
# (flag, default, help): every option that changes what is measured, written out in the command stored with results
OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("thresholds", "default", "comma list of --long-prefill-token-threshold values, a server each ('default': none "
                              "given; 0: off)"),
    ("server-args", "", "more `sagellm serve` options for every configuration (e.g. '--max-long-partial-prefills 2')"),
    ("cases", "echo,long", "the loaded cases to run after the quiet one (comma list)"),
    ("every-s", 0.5, "seconds between the trickle's chats"),
    ("chat-words", 20, "words (about tokens) of a chat's message"),
    ("chat-tokens", 16, "a chat's max_tokens"),
    ("quiet-s", 30.0, "how long the quiet trickle is measured"),
    ("lead-s", 3.0, "seconds of trickle before the heavy request is sent"),
    ("echo-prompts", 16, "prompts of the echo request"),
    ("echo-tokens", 256, "tokens of each of them"),
    ("long-tokens", 6000, "tokens of the long prompt"),
    ("heavy-max-tokens", 2, "max_tokens of the heavy requests"),
    ("heavy-timeout-s", 900.0, "how long a heavy request may take"),
    ("seed", 0, "seed of the prompts and the trickle's spacing"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="the server's model (default: SmolLM2-135M-Instruct)")
    for flag, default, text in OPTIONS:
        if flag == "cases":
            parser.add_argument("--cases", type=_loaded_cases, default=default, help=f"{text} (default: %(default)s)")
            continue
        parser.add_argument(f"--{flag}", type=type(default), default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fairness.json"), help="JSON results")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    results = trio.run(_run, args)
    cpu = cpu_description()
    table = markdown(results)
    command = _command(args)
    print(table)
    print(f"\nCPU: {cpu}; {os.cpu_count()} cores")
    print(f"Command: `{command}` ({(time.monotonic() - started) / 60:.0f} min)")
    passed = accepted(next(iter(results.values())))
    print(f"Acceptance (trickle TTFT p99 < {ACCEPTED_RATIO:g}x quiet, echo and long): {'PASS' if passed else 'FAIL'}")
    payload = {"benchmark": "sagellm bench fairness", "command": command, "cpu": cpu, "results": results}
    with users_file(args.out, "write the results"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if passed else 1


async def _run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="sagellm-fairness-") as scratch:
        for threshold in (t.strip() for t in args.thresholds.split(",") if t.strip()):
            extra = [] if threshold == "default" else ["--long-prefill-token-threshold", threshold]
            extra += shlex.split(args.server_args)
            server = Server(Path(scratch) / f"t{threshold}", "colocated", args.model, tuple(extra), bench="fairness")
            try:
                await server.start()
                model = await served_model(server.port)
                results[threshold] = await _cases(server.port, model, args)
            finally:
                server.stop()
    return results


async def _cases(port: int, model: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    rng = random.Random(args.seed)
    warm: list[Chat] = []
    for _ in range(3):  # the first requests pay for what is made on first use
        await send_chat(port, {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                               "stream": True}, warm)  # fmt: skip
    heavy = {
        "quiet": None,
        "echo": echo_body(model, rng, args.echo_prompts, args.echo_tokens, args.heavy_max_tokens),
        "long": long_body(model, rng, args.long_tokens, args.heavy_max_tokens),
    }
    results = {}
    for case in ("quiet", *(c.strip() for c in args.cases.split(",") if c.strip())):
        results[case] = await _case(port, model, args, rng, heavy[case])
        quiet = results["quiet"]["ttft_p99_ms"]
        p99 = results[case]["ttft_p99_ms"]
        results[case]["p99_vs_quiet"] = p99 / quiet if p99 is not None and quiet else None
        progress(f"{case}: {results[case]}", "fairness")
    return results


async def _case(port: int, model: str, args: argparse.Namespace, rng: random.Random, heavy: dict | None) -> dict:
    """The trickle's chats sent while the heavy request ran (or for `quiet_s` without one), summarized."""
    chats: list[Chat] = []
    stop = trio.Event()
    summary: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, port, model, rng, args.every_s, args.chat_words, args.chat_tokens, stop, chats)
        if heavy is None:
            start = trio.current_time()
            await trio.sleep(args.quiet_s)
            end = trio.current_time()
        else:
            await trio.sleep(args.lead_s)
            done = await send_heavy(port, "/v1/completions", heavy, args.heavy_timeout_s)
            start, end = done.sent, trio.current_time()
            summary |= {"heavy_s": done.seconds, "heavy_status": done.status, "heavy_prompt_tokens": done.prompt_tokens}
        summary["loadavg_1m"] = os.getloadavg()[0]  # the machine is shared: how busy it was
        stop.set()
    counted = [c for c in chats if start <= c.sent < end]
    ttfts = [c.first_token_s for c in counted if c.first_token_s is not None]
    summary |= {"chats": len(counted), "no_first_token": len(counted) - len(ttfts)}
    summary |= {"ttft_p50_ms": percentile_ms(ttfts, 50), "ttft_p99_ms": percentile_ms(ttfts, 99)}
    # When in the heavy request the slowest chat was sent: at its end, the reply's building; all along, the steps.
    slowest = max((c for c in counted if c.first_token_s is not None), key=lambda c: c.first_token_s, default=None)
    summary["slowest_sent_at_s"] = None if slowest is None else round(slowest.sent - start, 2)
    return summary


def accepted(cases: dict[str, dict[str, Any]]) -> bool:
    """Both loaded cases' TTFT p99 under ACCEPTED_RATIO x the quiet one's, every chat with a first token."""
    loaded = [cases.get(case) or {"p99_vs_quiet": None} for case in LOADED]
    return all(c["p99_vs_quiet"] is not None and c["p99_vs_quiet"] < ACCEPTED_RATIO and not c["no_first_token"]
               for c in loaded)  # fmt: skip


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    headers = ["threshold", "case", "chats", "TTFT p50 ms", "TTFT p99 ms", "p99 vs quiet", "heavy request s",
               "load avg", "verdict"]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for threshold, cases in results.items():
        for case, c in cases.items():
            ratio = c["p99_vs_quiet"]
            verdict = "" if case == "quiet" else "ok" if ratio is not None and ratio < ACCEPTED_RATIO else "MISS"
            cells = [threshold, case, str(c["chats"]), _ms(c["ttft_p50_ms"]), _ms(c["ttft_p99_ms"]),
                     "–" if ratio is None else f"{ratio:.2f}x", _s(c.get("heavy_s")), f"{c['loadavg_1m']:.1f}",
                     verdict]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loaded_cases(text: str) -> str:
    unknown = [c for c in text.split(",") if c.strip() and c.strip() not in LOADED]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: the loaded cases are {', '.join(LOADED)}")
    return text


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _command(args: argparse.Namespace) -> str:
    """The run spelled out in full (every default made explicit), so the table's numbers can be reproduced."""
    parts = ["sagellm", "bench", "fairness"] + (["--model", args.model] if args.model else [])
    for flag, _, _ in OPTIONS:
        value = getattr(args, flag.replace("-", "_"))
        parts += [f"--{flag}", value if isinstance(value, str) else f"{value:g}"]
    return shlex.join(parts)
