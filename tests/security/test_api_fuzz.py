"""Thousands of requests generated from the gateway's own OpenAPI document (schemathesis, a fixed seed, valid and
invalid bodies, headers and paths; every route, the OpenAI, Responses and Messages bodies from their own Structs, the
admin routes with the admin key): none may get a 5xx, and the gateway serves on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # about a minute

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
# An operation's random examples of each kind (valid and invalid), beside its coverage cases (each field's bounds and
# wrong types, ~2,800 in all): bounded so the suite stays fast.
EXAMPLES = 10
CASES = 2500  # at least this many generated requests
# A short context: the coverage cases ask for each field's largest value, max_tokens too, and 87 generations to the
# model's 256 positions took 45 of the run's 65 s; past 64 a request is refused or cut as any other would be.
MAX_MODEL_LEN = 64


def test_generated_requests_never_get_a_server_error(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    limits = {"engine.max_model_len": MAX_MODEL_LEN}
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), model=model, **limits) as gw:
        command = [
            SCHEMATHESIS, "run", gw.url + "/openapi.json", "--checks", "not_a_server_error",
            "--max-examples", str(EXAMPLES), "--seed", "1", "--request-timeout", "30",
            "-H", f"Authorization: Bearer {gw.gateway.admin_key}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # its cache there
        assert done.returncode == 0, done.stdout[-4000:]
        generated = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
        assert generated is not None and int(generated[1]) >= CASES and generated[1] == generated[2], done.stdout[
            -2000:
        ]
        assert httpx.get(gw.url + "/health").json()["status"] == "ok"
