"""What a chat's `tools` and `tool_choice` mean for a model (`tools.plan`), without a server: the model's own template
when it shows tools, the ChatML fallback when it cannot, a 400 for any other template; a forced call's grammar; the
tools and the choice passed on, unenforced here, for a model another server serves."""

from __future__ import annotations

import msgspec
import pytest

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.replies.tool_parsers import FALLBACK_TEMPLATE, FORWARDED_CALLS
from sagellm.gateway.replies.tools import NamedToolChoice, Tool, plan

TOOLS = msgspec.convert(
    [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}], list[Tool]
)
LLAMA2 = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"  # neither tools nor ChatML
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
NAMED = msgspec.convert({"type": "function", "function": {"name": "get_weather"}}, NamedToolChoice)


def test_a_template_that_cannot_show_tools_is_a_400_naming_tools():
    with pytest.raises(ApiError) as refused:
        plan(TOOLS, "auto", True, LLAMA2)
    error = refused.value
    assert error.http_status == 400 and error.param == "tools" and "no tool support" in str(error)


def test_chatml_gets_the_fallback_template_and_a_forced_call_its_grammar():
    auto = plan(TOOLS, "auto", True, CHATML)
    assert auto.chat_template == FALLBACK_TEMPLATE and auto.parser == "hermes" and auto.constraint is None
    named = plan(TOOLS, NAMED, False, CHATML)
    assert named.constraint is not None and "get_weather" in named.constraint.grammar
    assert plan(TOOLS, "none", True, CHATML).tools is None  # none: the tools stay out of the prompt


def test_a_model_another_server_serves_gets_the_tools_and_the_choice_as_given():
    forwarded = plan(TOOLS, NAMED, False, None)
    assert forwarded.forwarded == ({"type": "function", "function": {"name": "get_weather"}}, False)
    assert forwarded.tools is not None and forwarded.constraint is None and forwarded.parser == FORWARDED_CALLS
