"""rag_retrieve's checks that need no model: its parameters, the question it reads from a request, a missing index
(the whole operator on real models runs in tests/sage/test_sage_rag.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.common.errors import FieldError
from sagellm.operators.rag_retrieve import RagRetrieve
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import OperatorContext
from sagellm.runtime.rag import question_of


@pytest.mark.parametrize(("params", "field"), [({"k": 0}, "k"), ({"max_source_tokens": 0}, "max_source_tokens")])
def test_bad_parameters_name_themselves(params: dict, field: str) -> None:
    with pytest.raises(FieldError) as error:
        RagRetrieve(index="docs", **params)
    assert error.value.field == field


def test_the_question_is_the_last_user_message_or_the_prompt() -> None:
    chat = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": " last "},
    ]
    assert question_of(Request(request_id="a", messages=chat).messages) == "last"
    assert question_of(None, Request(request_id="b", prompt="a prompt").prompt) == "a prompt"
    assert question_of(Request(request_id="c", messages=[{"role": "system", "content": "x"}]).messages) == ""


def test_a_missing_index_fails_at_open_naming_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no retrieval index 'nowhere'.*indexes"):
        RagRetrieve(index="nowhere").open(OperatorContext("retrieve"))


def test_sources_take_at_most_half_the_served_context() -> None:
    from sagellm.runtime.rag import source_budget

    assert (source_budget(256), source_budget(8192), source_budget(None), source_budget(8192, 600)) == (
        128,
        1500,
        1500,
        600,
    )
