"""OpenAI's Codex CLI, from the npm registry and unchanged, against `sagellm serve` as a custom provider on the
Responses API: `codex exec --json` completes a turn (exit 0, the agent's message and the turn's usage from our server),
its request as Codex sends it (developer messages, a namespace of tools, a web search tool, reasoning, include,
prompt_cache_key, store false); a prompt over the context is reported by Codex, never a hang."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.agents.conftest import MODEL, npm_tool
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]

CODEX = "@openai/codex@0.171.0"
TURN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def codex(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_tool(tmp_path_factory, CODEX, "codex")


def _turn(codex: Path, url: str, home: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """One `codex exec --json` turn with Codex's own home: our server as its only provider."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "sagellm"\n[model_providers.sagellm]\nname = "sagellm"\n'
        f'base_url = "{url}/v1"\nwire_api = "responses"\nenv_key = "SAGELLM_API_KEY"\n'
        "request_max_retries = 0\nstream_max_retries = 0\n"
    )
    env = {**os.environ, "CODEX_HOME": str(home), "SAGELLM_API_KEY": "unused"}
    work = home / "work"
    work.mkdir(exist_ok=True)
    command = [str(codex), "exec", "--json", "--skip-git-repo-check", "--sandbox", "read-only", "Say hello."]
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=TURN_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done, events


def test_codex_completes_a_turn_against_sagellm_serve(codex, long_context_model, tmp_path) -> None:
    config = tiny_config(tmp_path, served_model_name=MODEL)
    overrides = {"engine.max_model_len": 32768, "engine.kv_cache_memory_gb": 0.5, "engine.max_num_seqs": 4}
    with running_gateway(GRAPHS / "colocated.yaml", config, long_context_model, **overrides) as gateway:
        done, events = _turn(codex, gateway.url, tmp_path / "codex-home")
    kinds = [event["type"] for event in events]
    assert done.returncode == 0 and "turn.completed" in kinds, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (completed,) = [event for event in events if event["type"] == "turn.completed"]
    assert completed["usage"]["input_tokens"] > 5_000  # Codex's own prompt, served whole
    assert any(e["type"] == "item.completed" and e["item"]["type"] == "agent_message" for e in events), kinds


def test_a_prompt_over_the_context_is_reported_not_hung(codex, long_context_model, tmp_path) -> None:
    config = tiny_config(tmp_path, served_model_name=MODEL)
    overrides = {"engine.max_model_len": 4096, "engine.kv_cache_memory_gb": 0.2, "engine.max_num_seqs": 4}
    with running_gateway(GRAPHS / "colocated.yaml", config, long_context_model, **overrides) as gateway:
        done, events = _turn(codex, gateway.url, tmp_path / "codex-home")
    assert "turn.failed" in [event["type"] for event in events], done.stdout[-3000:]
    assert "context window" in done.stdout  # Codex's words for our context_length_exceeded
