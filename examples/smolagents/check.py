"""Acceptance check: smolagents' ToolCallingAgent runs a tool through an OpenAI-compatible server (`sagellm serve`).

The agent asks the model with the tool's JSON schema and smolagents' own `tool_choice="required"`; the check passes
when the agent executed the tool (its step memory holds a call of `get_weather` with a `city` argument, whose result
the tool returned) within --max-steps. Exit status 0 iff it did.

Run it with the python of a venv that has smolagents and openai (sageLLM's own .venv has no smolagents). From the
repository root, a server running (`sagellm serve --no-embedding --port 8000`):

    python3 -m venv /tmp/smol-venv && /tmp/smol-venv/bin/pip install smolagents openai
    /tmp/smol-venv/bin/python examples/smolagents/check.py --server http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

from smolagents import OpenAIServerModel, ToolCallingAgent, tool

CALLS: list[str] = []


@tool
def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: the city's name, e.g. Paris
    """
    CALLS.append(city)
    return f"sunny, 21 C in {city}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the server's base URL (without /v1)")
    parser.add_argument("--max-steps", type=int, default=3, help="the agent's steps at most")
    args = parser.parse_args()
    with urllib.request.urlopen(f"{args.server}/v1/models") as reply:
        model_id = json.load(reply)["data"][0]["id"]
    model = OpenAIServerModel(model_id, api_base=f"{args.server}/v1", api_key="unused", temperature=0, max_tokens=64)
    agent = ToolCallingAgent(tools=[get_weather], model=model, max_steps=args.max_steps, verbosity_level=0)
    answer = agent.run("What is the weather in Paris? Use the tool.")
    called = [call.name for step in agent.memory.steps for call in (getattr(step, "tool_calls", None) or [])]
    print(f"model {model_id}: tool calls {called}, get_weather ran for {CALLS}, final answer {answer!r}")
    return 0 if "get_weather" in called and CALLS else 1


if __name__ == "__main__":
    sys.exit(main())
