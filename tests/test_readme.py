"""Every code block of the README runs as written: bash blocks through a shell with this checkout's `sagellm` and
`python` first on PATH, Python blocks in a fresh interpreter, the JSONL block is the request file its command reads,
and the YAML block is the shipped graph it says it abridges. Real models (SmolLM2 and all-MiniLM-L6-v2 from their
PyPI wheels) in a home of this session's own. The quick start's `scripts/install.sh` and `scripts/test.sh` are this
suite's own set-up and the suite itself: the test runs the rest of that block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
BLOCKS = [(lang, text) for lang, text in BLOCK.findall((ROOT / "README.md").read_text())]
SUITE_ITSELF = re.compile(r"bash scripts/(install|test)\.sh( &&)?\s*")
RUN_TIMEOUT_S = 600
# What each runnable block must print (stdout), beyond exiting 0, by its first line's start.
EXPECTED = {
    "# 1. set up": "Paris",
    "sagellm gateway start": "384",
    "from sagellm import UnifiedInferenceClient": "384",
    "from sagellm.dsl import Environment\n\nenv": "1 completed",
    "from sagellm.dsl import Environment\nfrom sagellm.sage": "Paris",
    "sagellm run graphs/pd.yaml --sage": "Paris",
    "# structured output": "City(name=",
    "import asyncio\n\nfrom sagellm.control_plane": "COMPLETED The capital of France is Paris.",
}


def _blocks(*languages: str) -> list[tuple[int, str]]:
    return [(i, text) for i, (lang, text) in enumerate(BLOCKS) if lang in languages]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    home = tmp_path_factory.mktemp("readme-home")
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SAGELLM_HOME": str(home), "COLUMNS": "120"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the blocks run (not the checkout: they write results files), holding the README's request file."""
    work = tmp_path_factory.mktemp("readme-work")
    ((_, requests),) = _blocks("jsonl")
    (work / "reqs.jsonl").write_text(requests)
    return work


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(_blocks("bash")) >= 3 and len(_blocks("python")) >= 3
    texts = [text for _, text in _blocks("bash", "python")]
    assert all(any(text.startswith(key) for text in texts) for key in EXPECTED)


@pytest.mark.parametrize("index", [i for i, _ in _blocks("bash", "python")], ids=lambda i: f"block-{i}")
def test_block_runs(index: int, env: dict[str, str], workdir: Path) -> None:
    lang, text = BLOCKS[index]
    quick_start = "scripts/install.sh" in text
    if lang == "bash":
        script = SUITE_ITSELF.sub("", text)
        command = ["bash", "-euo", "pipefail", "-c", script]
    else:
        command = [sys.executable, "-c", text]
    cwd = ROOT if quick_start else workdir  # the quick start names .venv/bin/ as a fresh clone has it
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    finally:
        if "gateway start" in text:  # never leave it running, whatever happened
            subprocess.run(["sagellm", "gateway", "stop"], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, f"{text}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
    expected = next((want for key, want in EXPECTED.items() if text.startswith(key)), None)
    if expected is not None:
        assert expected in done.stdout, done.stdout[-3000:]


def test_the_yaml_block_is_the_shipped_graph_abridged() -> None:
    ((_, text),) = _blocks("yaml")
    shown = yaml.safe_load(text)
    shipped = yaml.safe_load((ROOT / "graphs" / "pd.yaml").read_text())
    assert {k: shipped[k] for k in shown} == shown
