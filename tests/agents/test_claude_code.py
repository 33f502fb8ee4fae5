"""Claude Code, from the npm registry and unchanged, against `sagellm serve`: `claude -p` completes a turn (exit 0,
its result the text our server made) through the Messages API, and a prompt over the context is a 400 in Anthropic's
shape, which Claude Code reports and exits on instead of hanging.

Claude Code's prompt is ~20,000 tokens (its system prompt and two dozen tools' schemas), beyond SmolLM2's 8,192: the
model is `long_context_model` (conftest.py), whose replies are noise but whose serving path is the real one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sagellm.gateway.serving.core import metrics_snapshot
from tests.agents.conftest import MODEL, npm_tool
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.332"
TURN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def claude(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_tool(tmp_path_factory, CLAUDE_CODE, "claude")


def _agent_env(home: Path, url: str, max_output_tokens: int) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(home),  # its settings and sessions, never the user's
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "sk-local",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry or update checks: only our server
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output_tokens),
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,  # its small model's side requests come here too
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
    }


def _turn(claude: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    command = [str(claude), "-p", "Say hello.", "--output-format", "json", "--model", MODEL]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=TURN_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_claude_code_completes_a_turn_against_sagellm_serve(claude, long_context_model, tmp_path) -> None:
    config = tiny_config(tmp_path, served_model_name=MODEL)
    overrides = {"engine.max_model_len": 32768, "engine.kv_cache_memory_gb": 0.5, "engine.max_num_seqs": 4}
    with running_gateway(GRAPHS / "colocated.yaml", config, long_context_model, **overrides) as gateway:
        done = _turn(claude, _agent_env(tmp_path / "home", gateway.url, 64), tmp_path)
        served = metrics_snapshot(gateway.core).completed
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    assert result["type"] == "result" and not result["is_error"], result
    assert result["usage"]["input_tokens"] + result["usage"]["cache_read_input_tokens"] > 10_000  # its real prompt
    assert result["usage"]["output_tokens"] > 0 and served >= 1


def test_a_prompt_over_the_context_is_reported_not_hung(claude, long_context_model, tmp_path) -> None:
    config = tiny_config(tmp_path, served_model_name=MODEL)
    overrides = {"engine.max_model_len": 8192, "engine.kv_cache_memory_gb": 0.2, "engine.max_num_seqs": 4}
    with running_gateway(GRAPHS / "colocated.yaml", config, long_context_model, **overrides) as gateway:
        done = _turn(claude, _agent_env(tmp_path / "home", gateway.url, 64), tmp_path)
    assert done.returncode != 0
    result = json.loads(done.stdout)
    assert result["is_error"] and "prompt is too long" in result["result"].lower(), result  # our 400, as it reads it
