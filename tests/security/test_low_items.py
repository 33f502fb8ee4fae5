"""Issue 62's low items, each reproduction replayed against one served gateway (a tiny Llama, LoRA enabled, two user
keys): a LoRA path aimed at a file the server may read but the caller may not echoes nothing of it, and a config too
deep or too large is a 400, not a 500; one key's stored responses never evict another's; a control character in a
request head is a 400; a failed engine's text names no absolute path of the state directory."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.responses.store import ResponseStore
from sagellm.gateway.server import GatewayThread
from sagellm.runtime.models.lora_adapter import MAX_CONFIG_BYTES
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow

KEY_A, KEY_B, ADMIN_KEY = "user-key-a-0123456789", "user-key-b-0123456789", "admin-key-0123456789"
SECRET = "s3cr3t-do-not-echo"
LORA = {"enable_lora": True, "max_loras": 1, "max_lora_rank": 8, "kv_cache_memory_gb": 0.05, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    tmp = tmp_path_factory.mktemp("low-items")
    config = tiny_config(tmp, api_keys=[KEY_A, KEY_B], admin_key=ADMIN_KEY)
    overrides = {f"engine.{name}": value for name, value in LORA.items()}
    with running_gateway(GRAPHS / "colocated.yaml", config, make_tiny_llama(tmp / "tiny-llama"), **overrides) as gw:
        gw.state_dir = config.state_dir
        yield gw


def _client(gateway: GatewayThread, key: str) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=REPLY_TIMEOUT_S)


def _load_lora(gateway: GatewayThread, path: Path) -> httpx.Response:
    with _client(gateway, ADMIN_KEY) as admin:
        return admin.post("/v1/load_lora_adapter", json={"lora_name": "probe", "lora_path": str(path)})


def _private(path: Path, content: bytes) -> Path:
    """A file only its owner (the server's user, here) may read, as a key or a credentials file is."""
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def _adapter_linking(directory: Path, name: str, target: Path) -> Path:
    """An adapter directory whose file `name` is a symlink to `target`."""
    directory.mkdir()
    (directory / name).symlink_to(target)
    return directory


LORA_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


# -- LoRA adapters: nothing of a file the server reads on a caller's word comes back, and no config is a 500 ----------
@pytest.mark.parametrize("content", [{"api_token": SECRET}, {"peft_type": SECRET, "api_token": "x"}])
def test_a_symlinked_private_file_is_refused_without_its_contents(
    gateway: GatewayThread, tmp_path: Path, content: dict[str, str]
) -> None:
    """The reproduction: the file's `peft_type` came back in the error (any other value did once it said LORA)."""
    credentials = _private(tmp_path / "credentials.json", json.dumps(content).encode())
    reply = _load_lora(gateway, _adapter_linking(tmp_path / "adapter", "adapter_config.json", credentials))
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert 'peft_type: not "LORA"' in message and reply.json()["error"]["param"] == "lora_path"
    assert SECRET not in reply.text and "api_token" not in reply.text


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"private_note": SECRET}, "private_note: a setting this reader does not know"),  # the name, not the value
        ({"r": SECRET}, "r: must be an integer >= 1, got a string"),
        ({"lora_alpha": [SECRET]}, "lora_alpha: must be a number, got a list"),
        ({"use_dora": SECRET}, "use_dora: DoRA"),
        ({"bias": SECRET}, "bias: trained biases are not supported"),
        ({"target_modules": {"q_proj": SECRET}}, "target_modules: must be a list of module names or a regex, got an"),
    ],
)
def test_a_lora_config_s_values_are_named_by_type_only(
    gateway: GatewayThread, tmp_path: Path, setting: dict[str, Any], named: str
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(LORA_CONFIG | setting))
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    reply = _load_lora(gateway, tmp_path / "adapter")
    assert reply.status_code == 400 and named in reply.json()["error"]["message"], reply.text
    assert SECRET not in reply.text


def test_a_weights_file_s_header_is_not_echoed(gateway: GatewayThread, tmp_path: Path) -> None:
    """A private file shaped as safetensors (8 bytes of header length, then JSON): the parser's error quotes the
    header; ours says what broke."""
    header = json.dumps({"w": {"dtype": SECRET, "shape": [1], "data_offsets": [0, 4]}}).encode()
    private = _private(tmp_path / "private.bin", struct.pack("<Q", len(header)) + header + b"0000")
    adapter = _adapter_linking(tmp_path / "adapter", "adapter_model.safetensors", private)
    (adapter / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    reply = _load_lora(gateway, adapter)
    assert reply.status_code == 400 and "corrupt or truncated safetensors" in reply.text, reply.text
    assert SECRET not in reply.text


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nest too deeply"),  # the reproduction: was a 500 (RecursionError)
        (b'{"peft_type": "LORA", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nest too deeply"),
        (b" " * (MAX_CONFIG_BYTES + 1) + b"{}", f"over {MAX_CONFIG_BYTES} bytes"),
        (b"\xff\xfe{}", "unreadable JSON"),
    ],
)
def test_a_deep_huge_or_garbled_config_is_a_400(gateway: GatewayThread, tmp_path: Path, content: bytes, words: str):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_bytes(content)
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    reply = _load_lora(gateway, tmp_path / "adapter")
    assert reply.status_code == 400 and words in reply.json()["error"]["message"], reply.text[:300]


def test_what_is_not_an_adapter_directory_is_refused_by_what_it_is(gateway: GatewayThread, tmp_path: Path) -> None:
    a_file = _private(tmp_path / "config.json", json.dumps({"secret": SECRET}).encode())
    device = _adapter_linking(tmp_path / "device", "adapter_config.json", Path("/dev/zero"))  # read, it never ends
    started = time.monotonic()
    for path, status, words in [
        (a_file, 400, "not a directory"),
        (tmp_path / "nowhere", 404, "no such directory"),
        (device, 404, "no adapter_config.json"),
    ]:
        reply = _load_lora(gateway, path)
        assert reply.status_code == status and words in reply.json()["error"]["message"], reply.text
        assert SECRET not in reply.text
    assert time.monotonic() - started < 30


# -- the Responses store: a cap per key -----------------------------------------------------------------------------
def test_one_key_s_responses_never_evict_another_s() -> None:
    store = ResponseStore(per_owner=3, total=100)
    store.keep("b-0", "b", [{"role": "user", "content": "b's"}])
    for i in range(10):  # a busy key: its own oldest go
        store.keep(f"a-{i}", "a", [{"role": "user", "content": str(i)}])
    assert store.conversation("b-0", "b") == [{"role": "user", "content": "b's"}]
    assert [store.conversation(f"a-{i}", "a")[0]["content"] for i in (7, 8, 9)] == ["7", "8", "9"]
    with pytest.raises(ApiError, match="the latest 3 of each key") as forgotten:
        store.conversation("a-6", "a")
    assert forgotten.value.http_status == 404
    with pytest.raises(ApiError):  # another key's id is not found
        store.conversation("b-0", "a")


def test_past_the_total_the_largest_holder_loses_its_oldest() -> None:
    """Without API keys any key a caller sends is an owner: the total bounds memory, and it is the owner holding the
    most that loses, so callers that make owners at will take nothing from one holding a few."""
    store = ResponseStore(per_owner=4, total=6)
    for i in range(2):
        store.keep(f"small-{i}", "small", [])
    for i in range(4):
        store.keep(f"big-{i}", "big", [])
    store.keep("new-0", "new", [])  # 7 > 6: big (4) loses big-0
    store.keep("new-1", "new", [])  # big (3) loses big-1
    for owner, kept in {"small": ["small-0", "small-1"], "big": ["big-2", "big-3"], "new": ["new-0", "new-1"]}.items():
        assert all(store.conversation(i, owner) == [] for i in kept), owner
    for gone in ("big-0", "big-1"):
        with pytest.raises(ApiError):
            store.conversation(gone, "big")


def test_a_stored_response_is_its_key_s_alone(gateway: GatewayThread) -> None:
    asked = {"model": gateway.core.model_name, "input": "hello", "max_output_tokens": 2}
    with _client(gateway, KEY_A) as a, _client(gateway, KEY_B) as b:
        first = a.post("/v1/responses", json=asked)
        assert first.status_code == 200, first.text
        following = asked | {"previous_response_id": first.json()["id"]}
        assert b.post("/v1/responses", json=following).status_code == 404
        assert a.post("/v1/responses", json=following).status_code == 200


# -- the HTTP head: control characters ------------------------------------------------------------------------------
def _raw(gateway: GatewayThread, request: bytes) -> bytes:
    """`request` on a fresh socket; the reply until the server closes it (or 10 s)."""
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Probe: a\x00b\r\n",  # the reproduction: was a 200
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Probe: a\x01b\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Probe: a\x7fb\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\x00evil\r\n",
        b"GET /hea\x00lth HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-\x00Probe: a\r\n",
    ],
)
def test_a_control_character_in_the_head_is_a_400(gateway: GatewayThread, head: bytes) -> None:
    received = _raw(gateway, head + b"Connection: close\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]
    assert b"control character" in received and b"RFC 9110" in received


def test_a_tab_and_bytes_above_ascii_in_a_value_are_taken(gateway: GatewayThread) -> None:
    received = _raw(
        gateway, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Probe: a\tb \xe9\r\nConnection: close\r\n\r\n"
    )
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]


# -- a failed engine's text: no absolute path of the state directory --------------------------------------------------
def test_a_failed_engine_s_error_names_its_log_without_the_state_directory(
    gateway: GatewayThread, tmp_path: Path
) -> None:
    state_dir = str(gateway.state_dir.resolve())
    with _client(gateway, ADMIN_KEY) as admin:
        started = admin.post("/v1/management/engines", json={"model": str(tmp_path / "missing"), "kind": "llm"})
        assert started.status_code == 201, started.text
        engine, deadline = started.json(), time.monotonic() + 60
        while engine["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)
            engine = admin.get(f"/v1/management/engines/{engine['id']}").json()
        listed = admin.get("/v1/management/engines").text
        admin.delete(f"/v1/management/engines/{engine['id']}")
    error = engine["last_error"]
    assert engine["state"] == "failed" and "missing: no such file or directory" in error, engine
    assert f"engine.log of engine {engine['id']} in the gateway's state directory" in error
    assert state_dir not in error and state_dir not in listed
