"""The generated reference pages of the documentation: the CLI, the configuration and the OpenAI API's request
fields, read from the code that
defines them, so they are complete by construction. Each page in `docs/reference/` keeps its hand-written
introduction down to its marker line; everything after the marker is this package's output, written by
`python -m sagellm.cli.reference` and committed, so the pages read the same on the site and in the repository.
`tests/docs/test_reference.py` fails when a page is stale, or when an option, an engine setting or an operator
parameter has no help to show.

It sits in the CLI's folder because the CLI is the top floor: the one that may read both the commands' parsers and
the engine, graph and operator code below them."""

from collections.abc import Callable
from pathlib import Path

from sagellm.cli.reference.commands import cli_reference
from sagellm.cli.reference.configuration import configuration_reference
from sagellm.cli.reference.openai_api import openai_reference

# page under docs/ -> (the marker line its generated part follows, what makes that part)
PAGES: dict[str, tuple[str, Callable[[], str]]] = {
    "reference/cli.md": ("<!-- sagellm:cli-reference -->", cli_reference),
    "reference/configuration.md": ("<!-- sagellm:config-reference -->", configuration_reference),
    "reference/openai-api.md": ("<!-- sagellm:openai-reference -->", openai_reference),
}


def rendered(page: str, current: str) -> str:
    """`current` (the page as it stands) with everything after its marker line replaced by the generated reference."""
    marker, generate = PAGES[page]
    intro, found, _ = current.partition(marker)
    if not found:
        raise ValueError(f"docs/{page} has no {marker} line to put the generated reference after")
    return f"{intro}{marker}\n\n{generate().strip()}\n"


def write_pages(docs: Path) -> list[Path]:
    """Regenerates every page under `docs`; returns the ones whose text changed."""
    changed = []
    for page in PAGES:
        path = docs / page
        current = path.read_text()
        new = rendered(page, current)
        if new != current:
            path.write_text(new)
            changed.append(path)
    return changed


__all__ = ["PAGES", "cli_reference", "configuration_reference", "openai_reference", "rendered", "write_pages"]
