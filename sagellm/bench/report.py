"""Where every benchmark's results go: `STEM.json` with every number and the machine, and `STEM.png`, a chart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json_and_plot(stem: Path, payload: dict[str, Any], plot: Callable[[Path], None]) -> tuple[Path, Path]:
    """Writes `payload` (JSON has no NaN: pass finite numbers or None) and calls `plot(png_path)`; makes the folder."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    plot(png_path)
    return json_path, png_path
