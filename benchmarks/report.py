"""What every benchmark shares for its results: the `--repeats` option, the median over repeats of each number (one
run on a shared, noisy machine proves little), and where results go: `STEM.json` with every number and the machine,
and `STEM.png`, a chart."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.common.errors import users_file

REQUEST_COUNTS = ("completed", "failed")  # the summaries' request counts, summed over repeats rather than medianed


def median_summary(
    summaries: Sequence[Mapping[str, float | None]], summed: Collection[str] = REQUEST_COUNTS
) -> dict[str, float | None]:
    """Each number's median over repeats, the `summed` keys (request counts) summed instead. A value that is None or
    NaN, or a key a repeat lacks, was not measured in that repeat; a median nothing measured is None (JSON has no
    NaN). Keys keep their first-seen order."""
    merged: dict[str, float | None] = {}
    for key in dict.fromkeys(k for s in summaries for k in s):
        values = [v for s in summaries if (v := s.get(key)) is not None and not math.isnan(v)]
        merged[key] = sum(values) if key in summed else float(np.median(values)) if values else None
    return merged


def _repeats(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (the runs whose median is reported), got {text!r}")
    return value


def add_repeats_argument(parser: argparse.ArgumentParser, interleaved: str) -> None:
    """`--repeats N` (default 1), rejected by the parser (exit 2) below 1; `interleaved` names what each repeat
    runs in turn ("configurations", "policies")."""
    parser.add_argument(
        "--repeats",
        type=_repeats,
        default=1,
        help=f"runs, each a fresh trace (seed + repeat) through every one of the {interleaved} in turn; tables "
        "show medians, request counts summed (default: %(default)s)",
    )


def write_json_and_plot(stem: Path, payload: dict[str, Any], plot: Callable[[Path], None]) -> tuple[Path, Path]:
    """Writes `payload` (JSON has no NaN: pass finite numbers or None) and calls `plot(png_path)`; makes the folder."""
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    with users_file(json_path, "write the results"):
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    plot(png_path)
    return json_path, png_path
