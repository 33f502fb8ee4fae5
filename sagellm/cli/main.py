"""The `sagellm` command: one subcommand per file in this folder, each with `add_parser` and `run`.

Heavy imports (torch, transformers) happen inside `run`, so `sagellm --help` is instant. A failure the code names (a
`SageLLMError`: a bad flag, model or graph, a backend missing here, a worker that did not start) is printed as one
line, `sagellm CMD: error: MESSAGE`, and exits with its kind's code (`sagellm.common.errors`); anything else is a bug,
printed with its traceback. Ctrl-C exits 130."""

from __future__ import annotations

import argparse
import sys
import traceback
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
    run_batch_cmd,
    run_cmd,
    serve_cmd,
    simulate_cmd,
    worker_cmd,
)
from sagellm.cli.hinting_parser import HintingParser
from sagellm.common.logging import configure_logging
from sagellm.common.nursery_errors import leaves, named_failures
from sagellm.common.openmp import prefer_short_spin

COMMANDS = (
    run_cmd,
    serve_cmd,
    run_batch_cmd,
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
    parser = HintingParser(prog="sagellm", description="sageLLM: LLM serving as a dataflow of operators")
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
    try:
        configure_logging(getattr(args, "log_level", "warning"), log_format=getattr(args, "log_format", None))
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (Exception, BaseExceptionGroup) as error:  # a group may hold a KeyboardInterrupt
        return _failed(args.command, error)


def _failed(command: str, error: BaseException) -> int:
    """The exit code of a command that raised `error`, having said why on stderr: one line per failure the code named
    (several from one nursery: the highest code), a traceback for a bug."""
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves(error)):
        return 130
    named = named_failures(error)
    if named:
        for failure in named:
            print(f"sagellm {command}: error: {failure}", file=sys.stderr)
        return max(failure.exit_code for failure in named)
    traceback.print_exception(error)
    print(f"sagellm {command}: internal error: a bug in sageLLM; please report it with the traceback above",
          file=sys.stderr)  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
