"""Every code block of the README and the docs runs as written: bash blocks through a shell with this checkout's
`sagellm` and `python` first on PATH, Python blocks in a fresh interpreter, the JSONL block is the request file its
command reads, and each YAML block is the shipped graph it says it abridges. Real models (SmolLM2 and
all-MiniLM-L6-v2 from their PyPI wheels) in a home of this session's own. The quick start's `scripts/install.sh` and
`scripts/test.sh` are this suite's own set-up and the suite itself: the test runs the rest of that block. The blocks
that start the default gateway around their requests share one, started and stopped by those same commands once, and
a block whose code another already ran (the same quick start on two pages) passes on that run. Blocks of
other languages (console transcripts, text, mermaid diagrams) are shown, not run; so are the indented blocks listed
in NOT_RUN, each with what a test here lacks to run it (a new one fails until it is fenced, and run, or listed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# (page, language, text) of every fenced block, in page order
BLOCKS = [(page, lang, text) for page in PAGES for lang, text in BLOCK.findall(page.read_text())]
# An indented block's first words -> why it is shown and not run
NOT_RUN = {
    "source → admission": "a picture of the pipeline, not a command",
    "memory: weights": "a server's log line, shown as it prints",
    "ray start --head": "starts a Ray cluster across hosts",
    "sagellm serve --model chat=": "servers that run until stopped; test_serve_on_demand.py serves models on demand",
    "sagellm serve --no-embedding --port 8000": "the peer table: vLLM and llama.cpp servers beside ours, minutes",
    "sagellm bench numerics --peer": "needs the peers' servers (../shared/peers)",
    "sagellm serve --speculative-config": "servers that run until stopped; the speculation tests run the same",
    "sagellm chat": "interactive",
    "sagellm run graphs/pd_remote.yaml": "a worker on another host",
    "sagellm serve smollm2-135m-instruct --api-hub": "an API server on another host",
    "sagellm serve MODEL": "MODEL is the reader's; tests/agents runs Claude Code and Codex this way",
    "ANTHROPIC_BASE_URL=": "Claude Code with the reader's MODEL; tests/agents/test_claude_code.py runs it so",
    "model = \"MODEL\"": "Codex's config with the reader's MODEL; tests/agents/test_codex.py writes it so",
    "sagellm simulate --instances 1000": "a million requests: minutes; tests/simulator runs it small",
}
INDENTED = re.compile(r"(?:^|\n\n)((?: {4}\S.*(?:\n|$))(?: {4}.*(?:\n|$)|\n)*)")
ABRIDGED = re.compile(r"^# (graphs/[\w.]+\.yaml) \(abridged\)\n")
SUITE_ITSELF = re.compile(r"bash scripts/(install|test)\.sh( &&)?\s*")
GATEWAY_LINE = re.compile(r"^sagellm gateway (start|stop)[ \t]*(#.*)?\n?", re.M)  # the default one, no options
COMMENT_LINE = re.compile(r"^[ \t]*#.*\n?", re.M)
Runs = dict[tuple[str, str, Path], subprocess.CompletedProcess[str]]  # (language, code sans comments, cwd) -> run
CAPTURED = dict(capture_output=True, text=True, stdin=subprocess.DEVNULL)
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
    "# tool calling": "get_weather",
    "sagellm gateway start\npython - <<'PY'\nimport anthropic": "tool_use get_weather",
    "import asyncio\n\nfrom sagellm.control_plane": "COMPLETED The capital of France is Paris.",
}


def _shares_the_gateway(text: str) -> bool:
    """Starts the default gateway, runs requests, stops it: what the `gateway` fixture does once for all such."""
    return sorted(m.group(1) for m in GATEWAY_LINE.finditer(text)) == ["start", "stop"]


def _blocks(*languages: str) -> list[tuple[int, str]]:
    return [(i, text) for i, (_, lang, text) in enumerate(BLOCKS) if lang in languages]


def _block_id(index: int) -> str:
    page = BLOCKS[index][0].relative_to(ROOT)
    return f"{page}-{sum(1 for p, _, _ in BLOCKS[:index] if p == BLOCKS[index][0])}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    home = tmp_path_factory.mktemp("readme-home")
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SAGELLM_HOME": str(home), "COLUMNS": "120"}


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], workdir: Path) -> Iterator[None]:
    """`sagellm gateway start` once for the blocks that start and stop it around their requests (SmolLM2 and
    all-MiniLM-L6-v2 loading, ~20 s each time otherwise); `sagellm gateway stop` after the last of them."""
    command = ["sagellm", "gateway"]
    run = dict(cwd=workdir, env=env, **CAPTURED)
    try:
        started = subprocess.run([*command, "start"], timeout=RUN_TIMEOUT_S, **run)
        assert started.returncode == 0, f"--- stdout\n{started.stdout[-3000:]}\n--- stderr\n{started.stderr[-5000:]}"
        yield
    finally:
        stopped = subprocess.run([*command, "stop"], timeout=120, **run)
    assert stopped.returncode == 0 and "gateway stopped" in stopped.stderr, stopped.stderr


@pytest.fixture(scope="module")
def runs() -> Runs:
    """Each code run so far, by language, code without its comment lines and directory: the same code runs once."""
    return {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the blocks run (not the checkout: they write results files), holding the docs' request file."""
    work = tmp_path_factory.mktemp("readme-work")
    ((_, requests),) = _blocks("jsonl")
    (work / "reqs.jsonl").write_text(requests)
    return work


def test_the_docs_have_the_blocks_this_test_runs() -> None:
    assert len(_blocks("bash")) >= 3 and len(_blocks("python")) >= 3
    texts = [text for _, text in _blocks("bash", "python")]
    assert all(any(text.startswith(key) for text in texts) for key in EXPECTED)


# The blocks sharing the gateway last, so it runs only while they do.
RUNNABLE = sorted((i for i, _ in _blocks("bash", "python")), key=lambda i: _shares_the_gateway(BLOCKS[i][2]))


@pytest.mark.parametrize("index", RUNNABLE, ids=_block_id)
def test_block_runs(index: int, env: dict[str, str], workdir: Path, runs: Runs, request: pytest.FixtureRequest) -> None:
    _, lang, text = BLOCKS[index]
    quick_start = "scripts/install.sh" in text
    shared = _shares_the_gateway(text)
    if shared:
        request.getfixturevalue("gateway")
    if lang == "bash":
        script = SUITE_ITSELF.sub("", GATEWAY_LINE.sub("", text) if shared else text)
        command = ["bash", "-euo", "pipefail", "-c", script]
    else:
        command = [sys.executable, "-c", text]
    cwd = ROOT if quick_start else workdir  # the quick start names .venv/bin/ as a fresh clone has it
    code = (lang, COMMENT_LINE.sub("", command[-1]), cwd)
    try:
        if code not in runs:  # else the same code, on another page, ran already: its run says
            runs[code] = subprocess.run(command, cwd=cwd, env=env, timeout=RUN_TIMEOUT_S, **CAPTURED)
    finally:
        if "gateway start" in text and not shared:  # never leave it running, whatever happened
            subprocess.run(["sagellm", "gateway", "stop"], env=env, capture_output=True, timeout=120)
    done = runs[code]
    assert done.returncode == 0, f"{text}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
    keys = [key for key in EXPECTED if text.startswith(key)]
    expected = EXPECTED[max(keys, key=len)] if keys else None  # the most specific start says
    if expected is not None:
        assert expected in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("index", [i for i, _ in _blocks("yaml")], ids=_block_id)
def test_a_yaml_block_is_the_shipped_graph_it_abridges(index: int) -> None:
    text = BLOCKS[index][2]
    named = ABRIDGED.match(text)
    assert named, f"a YAML block starts with '# graphs/NAME.yaml (abridged)':\n{text}"
    shown = yaml.safe_load(text)
    shipped = yaml.safe_load((ROOT / named.group(1)).read_text())
    assert {k: shipped[k] for k in shown} == shown


def _indented_blocks(text: str) -> list[str]:
    """The indented code blocks of a page: 4-space blocks after a blank line, outside fences and list items."""
    outside = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)
    blocks = []
    for block in INDENTED.findall(outside):
        first = block.strip().splitlines()[0]
        if not first.startswith(("-", "|", "*")):
            blocks.append(first)
    return blocks


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_indented_block_is_run_elsewhere_or_says_why_not(page: Path) -> None:
    unlisted = [first for first in _indented_blocks(page.read_text()) if not first.startswith(tuple(NOT_RUN))]
    assert unlisted == [], f"fence these (```bash, run by this test) or list them in NOT_RUN with why: {unlisted}"
