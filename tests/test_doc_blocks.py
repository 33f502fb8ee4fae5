"""Every code block of the README and the docs runs as a reader pastes it into a fresh shell after the README's
install: no PATH, VIRTUAL_ENV or PYTHONPATH of this test process, the system's PATH, the checkout's `.venv` as the
CI's clean clone's `scripts/install.sh --test` left it. The README's tour runs whole, its bash and Python blocks in
order as one shell session in the checkout, as written but for its port. A block that names `.venv/` itself
(activating it, or spelling its commands so) runs as written; the others run after `source .venv/bin/activate`,
which getting-started.md asks for once per shell. Python blocks are pasted into that shell's `python -`; the JSONL
block is the request file its command reads, and each YAML block is the shipped graph it says it abridges. Real
models (SmolLM2 and all-MiniLM-L6-v2 from their PyPI wheels) in a home of this session's own. The quick start's
`scripts/install.sh` and `scripts/test.sh` are this suite's own set-up and the suite itself: the test runs the rest
of that block. The blocks that start the default gateway around their requests share one, started and stopped by
those same commands once, and a block whose code another already ran (the same quick start on two pages) passes on
that run. Every gateway listens on a free port: the docs' 8000 in a block's text is rewritten to it, nothing else is
(xdist workers, and anything else on the machine, never meet on a port). Blocks of other languages (console
transcripts, text, mermaid diagrams) are shown, not run; so are the indented blocks listed in NOT_RUN, each with what
a test here lacks to run it (a new one fails until it is fenced, and run, or listed)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.gateway.conftest import free_port

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# (page, language, text) of every fenced block, in page order
BLOCKS = [(page, lang, text) for page in PAGES for lang, text in BLOCK.findall(page.read_text())]
# The README's tour: its section's blocks, in order
TOUR_SECTION = re.search(r"^## A tour\n(.*?)^## ", (ROOT / "README.md").read_text(), re.S | re.M)
TOUR = [(lang, text) for lang, text in BLOCK.findall(TOUR_SECTION.group(1)) if lang in ("bash", "python")]
# A fresh login shell's PATH (Debian's and Ubuntu's): no venv on it until a block, or the activation, puts one there
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ACTIVATE = "source .venv/bin/activate"
ACTIVATION_LINE = re.compile(r"\Asource \.venv/bin/activate\b.*\n")
DOCS_PORT = re.compile(r"\b8000\b")  # the port the docs name (the gateway's default)
PYTHON_PASTE = "SAGELLM_DOC_BLOCK"  # the heredoc that pastes a Python block into `python -`
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
    'model = "MODEL"': "Codex's config with the reader's MODEL; tests/agents/test_codex.py writes it so",
    "sagellm simulate --instances 1000": "a million requests: minutes; tests/simulator runs it small",
}
INDENTED = re.compile(r"(?:^|\n\n)((?: {4}\S.*(?:\n|$))(?: {4}.*(?:\n|$)|\n)*)")
ABRIDGED = re.compile(r"^# (graphs/[\w.]+\.yaml) \(abridged\)\n")
SUITE_ITSELF = re.compile(r"bash scripts/(install|test)\.sh( &&)?\s*")
GATEWAY_LINE = re.compile(r"^sagellm gateway (start|stop)[ \t]*(#.*)?$\n?", re.M)  # the default one, no options
COMMENT_LINE = re.compile(r"^[ \t]*#.*\n?", re.M)
Runs = dict[tuple[str, Path], subprocess.CompletedProcess[str]]  # (script sans comment lines, cwd) -> its run
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
    "sagellm gateway start\npython - <<'PY'\nimport ollama": "all-minilm-l6-v2:latest",
    "sagellm gateway start\npython - <<'PY'\nimport json, time": "completed BatchRequestCounts(completed=2",
    "import asyncio\n\nfrom sagellm.control_plane": "COMPLETED The capital of France is Paris.",
    "cat > keys.yaml": "200\n200\n429\n",
    "pip install -q opentelemetry-sdk": "otlp_sink: 10 spans received",
}


def _shares_the_gateway(text: str) -> bool:
    """Starts the default gateway, runs requests, stops it: what the `gateway` fixture does once for all such."""
    return sorted(m.group(1) for m in GATEWAY_LINE.finditer(text)) == ["start", "stop"]


def _blocks(*languages: str) -> list[tuple[int, str]]:
    return [(i, text) for i, (_, lang, text) in enumerate(BLOCKS) if lang in languages]


def _in_tour(index: int) -> bool:
    page, lang, text = BLOCKS[index]
    return page.name == "README.md" and (lang, text) in TOUR


def _as_pasted(blocks: list[tuple[str, str]], port: int) -> str:
    """Blocks as one shell session pastes them, bash as is and Python into `python -`, on `port` for 8000."""
    script = "".join(text if lang == "bash" else f"python - <<'{PYTHON_PASTE}'\n{text}{PYTHON_PASTE}\n"
                     for lang, text in blocks)  # fmt: skip
    return DOCS_PORT.sub(str(port), script)


def _in_fresh_shell(script: str, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, timeout=timeout, **CAPTURED)


def _stop_gateway(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`sagellm gateway stop` in the home of `env`, whatever ran before (nothing running: exit 1, said)."""
    return _in_fresh_shell(f"{ACTIVATE}\nsagellm gateway stop", env, ROOT, 120)


def _expected(text: str) -> str | None:
    """What a block must print: the most specific start of EXPECTED's that it has, its activation line aside."""
    start = ACTIVATION_LINE.sub("", text)
    keys = [key for key in EXPECTED if start.startswith(key)]
    return EXPECTED[max(keys, key=len)] if keys else None


def _block_id(index: int) -> str:
    page = BLOCKS[index][0].relative_to(ROOT)
    return f"{page}-{sum(1 for p, _, _ in BLOCKS[:index] if p == BLOCKS[index][0])}"


def _fresh_env(home: Path) -> dict[str, str]:
    """A fresh shell's environment in the test's own home (models, gateway state; the kernels' folder is the run's,
    tests/conftest.py): none of this process's venv (PATH, VIRTUAL_ENV, PYTHONPATH), the system's PATH."""
    fresh = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**fresh, "PATH": SYSTEM_PATH, "SAGELLM_HOME": str(home), "COLUMNS": "120"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    assert (ROOT / ".venv/bin/activate").is_file(), "the docs' blocks run against the checkout's .venv: install.sh"
    return _fresh_env(tmp_path_factory.mktemp("readme-home"))


@pytest.fixture(scope="module")
def port() -> int:
    """Where this module's gateways listen, for the docs' 8000."""
    return free_port()


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], port: int) -> Iterator[None]:
    """`sagellm gateway start` once for the blocks that start and stop it around their requests (SmolLM2 and
    all-MiniLM-L6-v2 loading, ~20 s each time otherwise); `sagellm gateway stop` after the last of them."""
    try:
        started = _in_fresh_shell(f"{ACTIVATE}\nsagellm gateway start --port {port}", env, ROOT, RUN_TIMEOUT_S)
        assert started.returncode == 0, f"--- stdout\n{started.stdout[-3000:]}\n--- stderr\n{started.stderr[-5000:]}"
        yield
    finally:
        stopped = _stop_gateway(env)
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
    texts = [ACTIVATION_LINE.sub("", text) for _, text in _blocks("bash", "python")]
    assert all(any(text.startswith(key) for text in texts) for key in EXPECTED)
    assert [lang for lang, _ in TOUR] == ["bash", "python", "python"] and TOUR[0][1].startswith(f"{ACTIVATE}\n")
    assert f"`{ACTIVATE}`, once per shell" in (ROOT / "docs/getting-started.md").read_text()  # what the rest run after


def test_the_readme_tour_runs_as_pasted_in_a_fresh_shell(env: dict[str, str], tmp_path: Path) -> None:
    """In a home of its own, so a gateway another test of this module started (xdist may interleave them) is not
    the one the tour's `gateway start` finds running; its models are the module's, downloaded once."""
    shared = Path(env["SAGELLM_HOME"]) / "models"
    shared.mkdir(parents=True, exist_ok=True)
    (tmp_path / "models").symlink_to(shared)
    tour_env = _fresh_env(tmp_path)
    try:
        ran = _in_fresh_shell(_as_pasted(TOUR, free_port()), tour_env, ROOT, RUN_TIMEOUT_S)
    finally:
        _stop_gateway(tour_env)  # never leave it running, whatever happened
    assert ran.returncode == 0, f"--- stdout\n{ran.stdout[-3000:]}\n--- stderr\n{ran.stderr[-5000:]}"
    for _, text in TOUR:
        assert (_expected(text) or "") in ran.stdout, (text, ran.stdout[-3000:])


# The blocks sharing the gateway last, so it runs only while they do; the tour's run above.
RUNNABLE = sorted((i for i, _ in _blocks("bash", "python") if not _in_tour(i)),
                  key=lambda i: _shares_the_gateway(BLOCKS[i][2]))  # fmt: skip


@pytest.mark.parametrize("index", RUNNABLE, ids=_block_id)
def test_block_runs(
    index: int, env: dict[str, str], port: int, workdir: Path, runs: Runs, request: pytest.FixtureRequest
) -> None:
    _, lang, text = BLOCKS[index]
    shared = _shares_the_gateway(text)
    if shared:
        request.getfixturevalue("gateway")
    if lang == "bash":
        text = SUITE_ITSELF.sub("", GATEWAY_LINE.sub("", text) if shared else text)
    names_the_venv = ".venv/" in text
    script = _as_pasted([(lang, text)], port)
    if not names_the_venv:
        script = f"source {ROOT}/.venv/bin/activate\n{script}"  # what getting-started.md asks for, once per shell
    cwd = ROOT if names_the_venv else workdir  # a block naming .venv/ names the checkout's, from the checkout
    code = (COMMENT_LINE.sub("", script), cwd)
    try:
        if code not in runs:  # else the same code, on another page, ran already: its run says
            runs[code] = _in_fresh_shell(script, env, cwd, RUN_TIMEOUT_S)
    finally:
        if "gateway start" in text and not shared:  # never leave it running, whatever happened
            _stop_gateway(env)
    done = runs[code]
    assert done.returncode == 0, f"{text}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
    expected = _expected(BLOCKS[index][2])
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
