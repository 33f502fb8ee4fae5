"""The prefill server's KV outbox alone: each KV taken once, under a secret only the reply names; what nobody takes
is dropped after its time, and the oldest go first past the byte bound; a payload comes back as the same tensor."""

from __future__ import annotations

import msgspec
import pytest
import torch

from sagellm.gateway.serving.kv_outbox import KVOutbox, KVPayload


def kv(tokens: int) -> torch.Tensor:
    return torch.randn(2, 2, tokens, 2, 4)


def test_a_kv_is_named_once_and_taken_once_as_the_same_tensor():
    outbox = KVOutbox()
    data = kv(3)
    outbox.put("r1", [5, 6, 7], 9, data)
    secret = outbox.claim("r1")
    assert secret is not None and outbox.claim("r1") is None and outbox.take("guessed") is None
    prefilled = msgspec.msgpack.decode(outbox.take(secret), type=KVPayload).prefilled()
    assert (prefilled.prompt_token_ids, prefilled.first_token) == ([5, 6, 7], 9)
    assert torch.equal(prefilled.kv.data, data) and prefilled.kv.num_tokens == 3
    assert outbox.take(secret) is None and outbox.fetched == 1


def test_a_recurrent_models_states_travel_with_its_kv():
    outbox = KVOutbox()
    data, states = kv(3), torch.randn(37)
    outbox.put("r1", [5, 6, 7], 9, data, states)
    prefilled = msgspec.msgpack.decode(outbox.take(outbox.claim("r1")), type=KVPayload).prefilled()
    assert torch.equal(prefilled.kv.data, data) and torch.equal(prefilled.kv.states, states)
    outbox.put("r2", [5, 6, 7], 9, data)  # a model without them: none
    assert msgspec.msgpack.decode(outbox.take(outbox.claim("r2")), type=KVPayload).prefilled().kv.states is None


def test_what_nobody_takes_expires_and_the_oldest_go_first_past_the_bound(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("sagellm.gateway.serving.kv_outbox.time.monotonic", lambda: now[0])
    outbox = KVOutbox(ttl_s=10, max_bytes=2 * 2 * 2 * 8 * 4 * 4 + 1000)  # room for two 8-token KVs
    for name in ("a", "b", "c"):
        outbox.put(name, list(range(8)), 1, kv(8))
    secrets = {name: outbox.claim(name) for name in ("a", "b", "c")}
    assert outbox.take(secrets["a"]) is None  # the oldest, dropped for the third
    now[0] += 11
    assert outbox.take(secrets["b"]) is None and outbox.take(secrets["c"]) is None  # expired


@pytest.mark.parametrize("shape", [(2, 3, 3, 2, 4), (2, 2, 4, 2, 4)])
def test_a_payload_that_is_not_a_prompts_kv_is_refused(shape):
    payload = KVPayload.of([1, 2, 3], 9, torch.zeros(shape))
    with pytest.raises(ValueError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(payload), type=KVPayload).prefilled()
