"""`sagellm generate`: stream a reply from the offline engine (default model: SmolLM2-135M-Instruct)."""

from __future__ import annotations

import argparse
import sys

from sagellm.cli.engine_flags import add_engine_arguments, engine_settings
from sagellm.cli.sampling_flags import add_sampling_arguments, given_sampling


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a reply on the local engine", description=__doc__)
    p.add_argument("--prompt", "-p", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--model", "-m", default=None, help="path, .gguf or alias (default: smollm2-135m-instruct)")
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    add_sampling_arguments(p)
    p.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")
    add_engine_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sagellm.cli.progress_display import showing_progress
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    with showing_progress("sagellm generate"):
        # The model first, as `serve` does: a path that is not there is said before torch is imported (5-10 s).
        model = resolve_model(args.model or DEFAULT_MODEL)
        from sagellm import LLM, SamplingParams

        llm = LLM(str(model), **engine_settings(args))
    params = SamplingParams.with_defaults(llm.engine.sampling_defaults, **given_sampling(args))
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
