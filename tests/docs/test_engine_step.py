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
    source = textwrap.dedent(inspect.getsource(LLMEngine.step))
    body = textwrap.dedent(source.split('"""', 2)[2].lstrip("\n"))  # after the docstring
    first_line = re.escape(body.splitlines()[0])
    shown = re.search(rf"^```text\n({first_line}\n.*?)^```$", PAGE.read_text(), re.S | re.M)
    assert shown is not None, "docs/engine.md has no block opening with the first line of LLMEngine.step"
    assert shown.group(1) == body
