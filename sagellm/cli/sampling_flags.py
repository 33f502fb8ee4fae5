"""The sampling flags of the commands that ask a model themselves (`generate`, `chat`). A flag left out leaves its
field to the model's defaults, as a field left out of a request's JSON does (`SamplingParams.with_defaults`): the
commands pass on only what was given."""

from __future__ import annotations

import argparse
from typing import Any

FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def add_sampling_arguments(
    parser: argparse.ArgumentParser, *, top_k: bool = True, max_tokens_help: str = "(default: up to the context)"
) -> None:
    parser.add_argument("--max-tokens", type=int, help=max_tokens_help)
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: the model's, else 1)")
    parser.add_argument("--top-p", type=float, help="(default: the model's, else 1)")
    if top_k:
        parser.add_argument("--top-k", type=int, help="(default: the model's, else off)")
    parser.add_argument("--seed", type=int, default=None, help="this request's seed (default: none)")


def given_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling fields the command line gave, by SamplingParams' (and the OpenAI API's) names."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
