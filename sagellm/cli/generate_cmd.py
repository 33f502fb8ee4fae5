"""`sagellm generate`: stream a reply from the offline engine (default model: SmolLM2-135M-Instruct)."""

from __future__ import annotations

import argparse
import sys

from sagellm.cli.engine_flags import add_engine_arguments, engine_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a reply on the local engine", description=__doc__)
    p.add_argument("--prompt", "-p", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--model", "-m", default=None, help="path, .gguf or alias (default: smollm2-135m-instruct)")
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    p.add_argument("--max-tokens", type=int, help="(default: up to the context)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's, else 1)")
    p.add_argument("--top-p", type=float, help="(default: the model's, else 1)")
    p.add_argument("--top-k", type=int, help="(default: the model's, else off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="warning")
    add_engine_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sagellm import LLM, SamplingParams
    from sagellm.cli.progress_display import showing_progress

    with showing_progress("sagellm generate"):
        llm = LLM(args.model, **engine_settings(args))
    params = SamplingParams.with_defaults(
        llm.engine.sampling_defaults,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
    )  # fmt: skip
    prompt = args.prompt if args.raw else llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    final = None
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].text_delta)
        sys.stdout.flush()
        final = out
    sys.stdout.write("\n")
    if final is not None:
        m = final.metrics
        print(
            f"[{m.num_prompt_tokens} prompt + {m.num_output_tokens} output tokens, "
            f"TTFT {1000 * (m.ttft_s or 0):.0f} ms, TPOT {1000 * (m.tpot_s or 0):.1f} ms, "
            f"finish: {final.outputs[0].finish_reason}]",
            file=sys.stderr,
        )
    return 0
