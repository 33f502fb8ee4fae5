"""`sagellm chat [MODEL]`: an interactive chat, each reply streamed as it is generated.

    sagellm chat                                     # SmolLM2-135M-Instruct on this machine's engine
    sagellm chat ./model.gguf --temperature 0.7
    sagellm chat --url http://127.0.0.1:8000         # a running server (ours, vLLM, llama.cpp: the OpenAI API)
    echo "Why is the sky blue?" | sagellm chat       # piped: the input is one message, the reply goes to stdout
    sagellm chat --json-schema person.json           # every reply is JSON following the schema in person.json

At the prompt: an empty line does nothing, `/clear` forgets the conversation, `/bye` or Ctrl-D (or Ctrl-C twice) ends
it; the arrows edit the line and recall earlier ones, this session's and the last ones' ($SAGELLM_HOME/chat_history).
Ctrl-C during a reply stops it and the session goes on. The whole conversation is sent each turn (the model's chat
template renders it); once it no longer fits the context, the oldest turns are dropped."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from sagellm.cli.chat_terminal import Prompt, interrupts_deferred, line_editing, write_reply
from sagellm.cli.engine_flags import add_engine_arguments, engine_settings
from sagellm.cli.sampling_flags import add_sampling_arguments, given_sampling
from sagellm.common.errors import InvalidInput, SageLLMError, Unavailable, for_status
from sagellm.common.home import chat_history_file

Message = dict[str, str]
Reply = Callable[[list[Message]], Generator[str, None, None]]  # the conversation -> the reply's text, piece by piece


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model, replies streamed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="path, .gguf, alias or org/name (default: SmolLM2)")
    p.add_argument("--url", help="chat with this OpenAI-compatible server instead of a local engine")
    p.add_argument("--api-key", help="the server's API key (with --url)")
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--json-schema", type=Path, metavar="FILE", help="every reply is JSON following this JSON schema")
    add_sampling_arguments(p, top_k=False, max_tokens_help="most tokens per reply (default: up to the context)")
    p.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")
    add_engine_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reply = _remote(args) if args.url else _local(args)
    history: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    if not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        if not text:
            raise InvalidInput("nothing to say: stdin was empty")
        return 130 if _turn(reply, history, text) else 0
    print("sagellm chat: Ctrl-C stops a reply, /clear forgets the conversation, /bye or Ctrl-D ends it",
          file=sys.stderr)  # fmt: skip
    prompt = Prompt()
    with line_editing(chat_history_file()):
        while (line := prompt.read()) is not None:
            text = line.strip()
            if text == "/bye":
                break
            if text == "/clear":
                del history[1 if args.system else 0 :]
                print("(conversation cleared)", file=sys.stderr)
            elif text:
                _turn(reply, history, text)
    return 0


def _turn(reply: Reply, history: list[Message], text: str) -> bool:
    """Asks for and writes the reply to `text`; whether the user stopped it (Ctrl-C). A stopped reply stays in the
    conversation as far as it was written (the turn goes if nothing was)."""
    history.append({"role": "user", "content": text})
    written, stopped = write_reply(reply(history))
    if stopped and not written:
        history.pop()
    else:
        history.append({"role": "assistant", "content": written})
    return stopped


def _local(args: argparse.Namespace) -> Reply:
    """Replies from the engine in this process; the oldest turns go when the conversation outgrows the context."""
    from sagellm import LLM, GuidedDecoding, SamplingParams
    from sagellm.cli.progress_display import showing_progress
    from sagellm.runtime.engine.sampling_params import EXPECTED_OUTPUT_TOKENS

    with showing_progress("sagellm chat"):
        llm = LLM(args.model, **engine_settings(args))
    schema = _json_schema(args.json_schema)
    guided = GuidedDecoding(json=schema) if schema is not None else None
    params = SamplingParams.with_defaults(llm.engine.sampling_defaults, **given_sampling(args), guided=guided)
    context = llm.engine.max_model_len
    room = args.max_tokens or EXPECTED_OUTPUT_TOKENS  # kept free for the reply when old turns must go

    def reply(history: list[Message]) -> Generator[str, None, None]:
        prompt = llm.apply_chat_template(history)
        while len(prompt) + room > context and len(history) > 2:
            del history[1 if history[0]["role"] == "system" else 0]  # the oldest turn
            prompt = llm.apply_chat_template(history)
        outputs = llm.stream(prompt, params)
        try:
            while True:
                with interrupts_deferred():  # Ctrl-C waits for the step's end: the engine's state stays whole
                    out = next(outputs, None)
                if out is None:
                    return
                yield out.outputs[0].text_delta
        finally:
            outputs.close()  # a stopped reply's request is aborted

    return reply


def _remote(args: argparse.Namespace) -> Reply:
    """Replies from a server's /v1/chat/completions, streamed; its first model unless `model` names one."""
    import httpx

    base = args.url.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(10.0, read=None))
    model = args.model or _first_model(client, base)
    schema = _json_schema(args.json_schema)
    constraint = {"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}}

    def reply(history: list[Message]) -> Generator[str, None, None]:
        # what the command line left out, the server's defaults decide
        body: dict[str, Any] = {"model": model, "messages": history, "stream": True, **given_sampling(args)}
        body |= constraint if schema is not None else {}
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                if answer.status_code != 200:
                    why = answer.read().decode()[:500]
                    raise for_status(answer.status_code)(f"{base} answered {answer.status_code}: {why}")
                for line in answer.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise SageLLMError(f"{base}: {event['error'].get('message')}")
                        for choice in event.get("choices") or ():
                            yield (choice.get("delta") or {}).get("content") or ""
        except httpx.HTTPError as error:
            raise Unavailable(f"{base}: {type(error).__name__}: {error}") from None

    return reply


def _json_schema(path: Path | None) -> dict[str, Any] | None:
    """The JSON schema in `path` (None: no constraint); a file that is not one is an error naming it."""
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidInput(f"--json-schema {path}: {error}") from None
    if not isinstance(schema, dict):
        raise InvalidInput(f"--json-schema {path}: a JSON schema is an object, got {type(schema).__name__}")
    return schema


def _first_model(client: Any, base: str) -> str:
    """The first model the server lists (what to chat with when none is named)."""
    import httpx

    try:
        answer = client.get("/v1/models")
    except httpx.HTTPError as error:
        raise Unavailable(f"{base}: {type(error).__name__}: {error}") from None
    if answer.status_code != 200:
        raise for_status(answer.status_code)(f"{base}/v1/models answered {answer.status_code}: {answer.text[:500]}")
    return answer.json()["data"][0]["id"]
