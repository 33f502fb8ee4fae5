"""The salt route and pd_split hash a prompt under (`effective_salt`): a request's cache salt and its LoRA adapter's
digest, encoded so no client salt names another request's blocks; pd_split's uncached tokens count only a prefix sent
before under the same salt and adapter. (That the engine hashes alike: tests/engine/test_prefix_salt.py.)"""

from __future__ import annotations

from sagellm.operators.pd_split import PDSplit
from sagellm.operators.route import Route, prefix_salt
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.engine.prefix_hash import block_hashes, effective_salt
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext

DOCUMENT = list(range(100, 700))  # 37 full blocks of 16
ADAPTER = LoRARequest("first", 1, "/adapters/first", "ab" * 16)


def test_a_request_without_an_adapter_keeps_its_salt():
    assert effective_salt(None, None, None) is None
    assert effective_salt("tenant-a", None, None) == "tenant-a"
    assert prefix_salt(Request(request_id="r", cache_salt="tenant-a")) == "tenant-a"


def test_an_adapter_is_named_by_its_digest_not_its_name_or_path():
    by_digest = effective_salt("t", "first", "ab" * 16)
    assert effective_salt("t", "renamed", "ab" * 16) == by_digest  # equal weights share their blocks
    assert effective_salt("t", "first", "cd" * 16) != by_digest
    assert effective_salt("u", "first", "ab" * 16) != by_digest
    assert effective_salt(None, "first", None) != effective_salt(None, "first", "ab" * 16)  # no digest: by name
    moved = LoRARequest("first", 2, "/elsewhere", "ab" * 16)
    assert prefix_salt(Request(request_id="r", lora=moved)) == prefix_salt(Request(request_id="r", lora=ADAPTER))


def test_no_client_salt_names_an_adapter_s_blocks_or_another_salt_s():
    adapted = [
        effective_salt(salt, name, digest)
        for salt in (None, "", "t", "t\x00", "\x00lora:x")
        for name, digest in (("x", None), ("x", "x"), ("y", "x"))
    ]
    assert len(set(adapted)) == len(adapted) - 5  # names differ, digests equal: the same salt, once per salt
    sent = {"-\x00lora:x", "+\x00lora:x", "\x00lora:x", "t\x00", "t", *adapted}  # adapters' salts forged verbatim
    plain = {effective_salt(salt, None, None) for salt in sent}
    assert len(plain) == len(sent)
    assert set(adapted).isdisjoint(plain)


def test_route_records_a_lora_prompt_under_its_adapter():
    route = Route(strategy="cache_aware")
    route.open(OperatorContext(node_id="route", outputs=["e0"], instances={"e0": InstanceStats(name="e0")}))
    route.execute(Request(request_id="r", prompt_token_ids=DOCUMENT, cache_salt="t", lora=ADAPTER))
    assert route.prefix_index.cached_tokens("e0", DOCUMENT, block_hashes(DOCUMENT, 16, "t")) == 0
    salted = block_hashes(DOCUMENT, 16, effective_salt("t", "first", ADAPTER.lora_digest))
    assert route.prefix_index.cached_tokens("e0", DOCUMENT, salted) == 592


def test_pd_split_counts_a_prefix_cached_only_under_the_same_salt_and_adapter():
    split = PDSplit(threshold_tokens=512)
    split.open(OperatorContext(node_id="pd_split", outputs=["route"], instances={}))
    split.execute(Request(request_id="r", prompt_token_ids=DOCUMENT, cache_salt="t"))
    follow_up = DOCUMENT + list(range(5000, 5200))

    def uncached(**fields) -> int:
        return split.uncached_tokens(Request(request_id="q", prompt_token_ids=follow_up, **fields))

    assert uncached(cache_salt="t") == 208  # 592 of its tokens sent before under this salt
    assert uncached() == 800
    assert uncached(cache_salt="u") == 800
    assert uncached(cache_salt="t", lora=ADAPTER) == 800
    split.execute(Request(request_id="s", prompt_token_ids=DOCUMENT, cache_salt="t", lora=ADAPTER))
    assert uncached(cache_salt="t", lora=ADAPTER) == 208
