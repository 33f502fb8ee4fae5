"""The `sagellm` command: one subcommand per file in this folder, each with `add_parser` and `run`.

Heavy imports (torch, transformers) happen inside `run`, so `sagellm --help` is instant."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

from sagellm.cli import (
    api_server_cmd,
    backends_cmd,
    bench_cmd,
    chat_cmd,
    engine_cmd,
    gateway_cmd,
    generate_cmd,
    gpu_cmd,
    inspect_cmd,
    model_cmd,
    plan_cmd,
    preset_cmd,
    run_cmd,
    serve_cmd,
    simulate_cmd,
    worker_cmd,
)
from sagellm.common.logging import configure_logging
from sagellm.common.openmp import prefer_short_spin

COMMANDS = (
    run_cmd,
    serve_cmd,
    chat_cmd,
    gateway_cmd,
    engine_cmd,
    preset_cmd,
    generate_cmd,
    model_cmd,
    inspect_cmd,
    backends_cmd,
    gpu_cmd,
    plan_cmd,
    simulate_cmd,
    bench_cmd,
    worker_cmd,
    api_server_cmd,
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every command; of `sagellm bench`'s benchmarks only the one `argv` runs brings its options (importing them all
    is most of what any `--help` would otherwise cost)."""
    parser = argparse.ArgumentParser(prog="sagellm", description="sageLLM: LLM serving as a dataflow of operators")
    parser.add_argument("--version", action="version", version=f"sagellm {version('sagellm')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = [arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("-")]
    for module in COMMANDS:
        if module is bench_cmd:
            bench_cmd.add_parser(sub, kind=words[1] if words[:1] == ["bench"] and len(words) > 1 else None)
        else:
            module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_short_spin()  # before any command imports torch (the command modules themselves import nothing heavy)
    args = build_parser(argv).parse_args(argv)
    configure_logging(args.log_level if hasattr(args, "log_level") else "warning")
    try:
        return args.run(args) or 0
    except (ValueError, OSError, RuntimeError) as error:
        # Known failures (bad model path, unavailable backend, bad parameter) get one line, not a traceback.
        print(f"sagellm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
