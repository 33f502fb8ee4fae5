"""The graphs shipped with sageLLM, installed as `sagellm.graphs` beside the code: `colocated.yaml` (what `sagellm
serve` runs unless given a graph), `multi_instance.yaml`, `pd.yaml`, `pd_remote.yaml`.

`find` resolves a graph as a user names it: a file that exists, else a shipped graph by its file name, its name
without `.yaml`, or its path in the repository (`graphs/pd.yaml`), so the README's commands work from any directory
once sageLLM is installed from a wheel."""

from __future__ import annotations

from pathlib import Path

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
