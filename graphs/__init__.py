"""The graphs shipped with sageLLM, installed as `sagellm.graphs` beside the code: `colocated.yaml` (what `sagellm
serve` runs unless given a graph), `multi_instance.yaml`, `pd.yaml`, `pd_remote.yaml`, `epd.yaml`.

`find` resolves a graph as a user names it: a file that exists, else a shipped graph by its file name, its name
without `.yaml`, or its path in the repository (`graphs/pd.yaml`), so the README's commands work from any directory
once sageLLM is installed from a wheel. `existing` does the same for a name that must be a graph, and refuses one that
is neither with the shipped graphs' names and the one a typo (`pdd`) was probably meant to be."""

from __future__ import annotations

from pathlib import Path

from sagellm.common.errors import NotFound
from sagellm.common.typos import likely_meant

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "colocated.yaml"


def shipped() -> list[str]:
    """The shipped graphs' file names."""
    return sorted(p.name for p in HERE.glob("*.yaml"))


def find(name: str | Path) -> Path:
    """The graph file `name` means (returned as given when it is neither a file nor a shipped graph: the loader
    says it is missing)."""
    path = Path(name)
    if path.exists() or path.parent not in (Path(), Path("graphs")):
        return path
    candidate = HERE / (path.name if path.suffix else f"{path.name}.yaml")
    return candidate if candidate.is_file() else path


def existing(name: str | Path) -> Path:
    """`find(name)`, or NotFound naming the shipped graphs (and the closest one) when it is no file."""
    path = find(name)
    if path.exists():
        return path
    names = ", ".join(file.removesuffix(".yaml") for file in shipped())
    meant = likely_meant_graph(str(name))
    hint = f"; did you mean {meant}?" if meant else ""
    raise NotFound(f"{name}: no such graph file, nor a shipped graph ({names}){hint}")


def likely_meant_graph(name: str) -> str | None:
    """The shipped graph (by name, without `.yaml`) that `name` is probably a typo of, if any."""
    stem = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    return likely_meant(stem, [file.removesuffix(".yaml") for file in shipped()])
