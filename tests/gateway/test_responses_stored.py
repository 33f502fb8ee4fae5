"""Responses that keep state, through the official openai SDK against a tiny llama: `responses.retrieve` returns a
stored response as created, `responses.delete` forgets it (and its `previous_response_id`), a background response is
`queued` at once and polled to the same output as the same request answered whole, `responses.cancel` ends a running
one `cancelled`; stored responses outlive a gateway restart: `previous_response_id` continues a conversation
across it, and a background response the restart interrupted reads `failed`, saying why; and the Conversations API
(`conversations.create`, `items.list`, `items.create`, ...) holds a conversation that a response continues."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("responses"), served_model_name=MODEL, api_keys=["sk-a", "sk-b"])


@pytest.fixture(scope="module")
def gateway(config, tiny_model):
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        yield gw


def _client(gateway, key: str = "sk-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _polled(client: openai.OpenAI, response_id: str) -> openai.types.responses.Response:
    deadline = time.monotonic() + 120
    while (response := client.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, response
        time.sleep(0.05)
    return response


def test_retrieve_and_delete(gateway) -> None:
    client = _client(gateway)
    created = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0)
    kept = client.responses.retrieve(created.id)
    assert kept.model_dump() == created.model_dump()
    with pytest.raises(openai.NotFoundError):
        _client(gateway, "sk-b").responses.retrieve(created.id)  # another key's is as good as absent
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="and?", previous_response_id=created.id, max_output_tokens=4)


def test_a_background_response_is_polled_to_the_same_output(gateway) -> None:
    client = _client(gateway)
    asked = dict(model=MODEL, input="Count to five.", max_output_tokens=12, temperature=0)
    queued = client.responses.create(**asked, background=True)
    assert queued.status == "queued" and queued.background and queued.output == []
    done = _polled(client, queued.id)
    whole = client.responses.create(**asked)
    assert done.status == whole.status and done.output_text == whole.output_text
    assert done.usage.output_tokens == whole.usage.output_tokens
    follow = client.responses.create(model=MODEL, input="Again.", previous_response_id=done.id, max_output_tokens=4)
    assert follow.usage.input_tokens > whole.usage.input_tokens  # the conversation went on from the background one


def test_a_background_response_streams_and_streams_again_from_where_it_was(gateway) -> None:
    """`background` with `stream`: the events as they come, the response running on whoever listens; then
    `responses.retrieve(stream=True, starting_after=N)` gives the same events after N."""
    client = _client(gateway)
    asked = dict(model=MODEL, input="Count to five.", max_output_tokens=12, temperature=0)
    events = list(client.responses.create(**asked, background=True, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_id = events[0].response.id
    done = _polled(client, response_id)
    assert events[0].type == "response.created" and events[-1].type == f"response.{done.status}"  # incomplete: cut
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == done.output_text == client.responses.create(**asked).output_text
    again = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events[3:]]
    left = client.responses.create(**asked, background=True, stream=True)
    first = next(iter(left))
    left.close()  # a client that leaves does not stop a background response
    assert _polled(client, first.response.id).output_text == done.output_text
    with pytest.raises(openai.BadRequestError):  # a response answered whole has no events kept
        client.responses.retrieve(client.responses.create(**asked).id, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.responses.retrieve(response_id, starting_after=2)
    with pytest.raises(openai.NotFoundError):
        _client(gateway, "sk-b").responses.retrieve(response_id, stream=True)


def test_cancel_ends_a_running_background_response(gateway) -> None:
    client = _client(gateway)
    running = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=200,
                                      background=True, extra_body={"ignore_eos": True})  # fmt: skip
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(running.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):  # only background responses are cancelled
        client.responses.cancel(client.responses.create(model=MODEL, input="hi", max_output_tokens=2).id)


def test_input_items_list_what_a_response_was_answered_after(gateway) -> None:
    """Its own input, after a previous response's input items and output: newest first by default, in pages."""
    client = _client(gateway)
    first = client.responses.create(model=MODEL, input="Name a river.", max_output_tokens=6, temperature=0)
    (given,) = client.responses.input_items.list(first.id).data
    assert (given.type, given.role, given.content[0].text) == ("message", "user", "Name a river.")
    second = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Another."}],
                                     previous_response_id=first.id, max_output_tokens=6, temperature=0)  # fmt: skip
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [i.id for i in items][:1] == [given.id] and items[1].id == first.output[0].id
    assert items[2].content[0].text == "Another." and len(items) == 3
    newest = client.responses.input_items.list(second.id, limit=1)
    assert [i.id for i in newest.data] == [items[2].id] and newest.has_more
    rest = client.responses.input_items.list(second.id, limit=5, after=newest.last_id)
    assert [i.id for i in rest.data] == [items[1].id, items[0].id] and not rest.has_more
    with pytest.raises(openai.BadRequestError):  # nothing to include: a parameter not served is refused
        client.responses.input_items.list(second.id, include=["message.input_image.image_url"])
    with pytest.raises(openai.NotFoundError):
        _client(gateway, "sk-b").responses.input_items.list(second.id)


def test_stored_responses_outlive_a_restart(config, tiny_model) -> None:
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        client = _client(gw)
        first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=6, temperature=0)
        interrupted = client.responses.create(model=MODEL, input="A long one.", max_output_tokens=200,
                                              background=True, extra_body={"ignore_eos": True})  # fmt: skip
        while client.responses.retrieve(interrupted.id).status == "queued":
            time.sleep(0.02)
    kept = json.loads((config.state_dir / "responses" / f"{first.id}.json").read_text())
    assert kept["body"]["id"] == first.id and "sk-a" not in json.dumps(kept)  # the key's digest only
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        client = _client(gw)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        follow = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                         max_output_tokens=4)  # fmt: skip
        assert follow.usage.input_tokens > first.usage.input_tokens
        stopped = client.responses.retrieve(interrupted.id)
        assert stopped.status == "failed" and "restarted" in stopped.error.message


def test_conversations_through_the_sdk(gateway) -> None:
    client, other = _client(gateway), _client(gateway, "sk-b")
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}], metadata={"topic": "names"}
    )
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "names"}
    first = client.responses.create(model=MODEL, input="Hello!", conversation=conversation.id, max_output_tokens=6,
                                    temperature=0)  # fmt: skip
    assert first.conversation.id == conversation.id
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [(i.type, getattr(i, "role", None)) for i in items] == [("message", "user"), ("message", "user"),
                                                                    ("message", "assistant")]  # fmt: skip
    assert items[2].content[0].text == first.output_text
    # the same turn sent as plain input over the conversation's history says the same
    again = client.responses.create(model=MODEL, max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": "My name is Ada."}, {"role": "user", "content": "Hello!"}])  # fmt: skip
    assert again.output_text == first.output_text
    added = client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Bye."}])
    assert (
        len(added.data) == 1
        and client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id).id
    )
    client.conversations.items.delete(added.data[0].id, conversation_id=conversation.id)
    assert len(client.conversations.items.list(conversation.id).data) == 3
    with pytest.raises(openai.BadRequestError):
        client.conversations.items.list(conversation.id, include=["message.input_image.image_url"])
    assert client.conversations.update(conversation.id, metadata={"topic": "x"}).metadata == {"topic": "x"}
    with pytest.raises(openai.NotFoundError):
        other.conversations.retrieve(conversation.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="hi", conversation=conversation.id, previous_response_id=first.id)
    with pytest.raises(openai.BadRequestError):
        client.conversations.create(items=[{"type": "image_generation_call"}])
    assert client.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="hi", conversation=conversation.id)
