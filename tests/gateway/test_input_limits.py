"""Limits on what one request may ask of a shared resource."""

from __future__ import annotations

import pytest

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.embedding.api_router import embedding_inputs
from sagellm.runtime.engine.request_limits import MAX_EMBEDDING_INPUTS


def test_an_embedding_request_carries_a_bounded_number_of_inputs() -> None:
    assert embedding_inputs(["a"] * MAX_EMBEDDING_INPUTS) == ["a"] * MAX_EMBEDDING_INPUTS
    assert embedding_inputs([[1, 2]] * 3) == [[1, 2]] * 3 and embedding_inputs("one") == ["one"]
    with pytest.raises(ApiError) as raised:
        embedding_inputs(["a"] * (MAX_EMBEDDING_INPUTS + 1))
    assert raised.value.http_status == 400 and raised.value.param == "input" and "at most" in raised.value.message
