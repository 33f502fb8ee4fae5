"""The engine's page shows its step as the code has it: the `text` block of docs/engine.md that opens with the step's
first line is `LLMEngine.step`'s body, line for line, so the page cannot drift from the loop it explains."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

from sagellm.runtime.engine.llm_engine import LLMEngine

PAGE = Path(__file__).resolve().parents[2] / "docs" / "engine.md"


def test_the_engine_page_shows_the_step_as_written() -> None:
    shown = re.search(r"^```text\n(started = .*?)^```$", PAGE.read_text(), re.S | re.M)
    assert shown is not None, "docs/engine.md lost its block of LLMEngine.step"
    source = textwrap.dedent(inspect.getsource(LLMEngine.step))
    body = source.split('"""', 2)[2].lstrip("\n")  # after the docstring
    assert shown.group(1) == textwrap.dedent(body)
