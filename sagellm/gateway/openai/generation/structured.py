"""Structured output as the OpenAI API and vLLM spell it, read into the engine's one `GuidedDecoding`.

Four spellings reach the same constraint: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and its newer `structured_outputs` object.
A request gives at most one. Whether the constraint compiles is checked here too, before the request enters the
graph, in a worker thread with a time bound (compiling takes milliseconds, a pathological schema far longer), so a
schema that cannot be used, or that no output can meet (`GrammarCompiler.compile`), is a 400 naming the field it
came in, not an error after a wait in the queue."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from sagellm.common.errors import FieldError
from sagellm.gateway.http.errors import ApiError
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.pipeline.served_model import ServedModel

COMPILE_LIMIT_S = 10.0  # a constraint that takes longer to compile is refused (the thread finishes on its own)
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs` request field: the same names as `GuidedDecoding`."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool | None = None


class Constrained(msgspec.Struct, kw_only=True):
    """The structured-output fields completions and chat completions share (mixed into their bodies)."""

    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None


def guided_decoding(body: Constrained) -> tuple[GuidedDecoding, str] | None:
    """The body's constraint and the field it came in; None when it has none. A 400 naming the field for a
    constraint of the wrong shape, or two constraints at once."""
    given = [name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS) if _gives(body, name)]
    if len(given) > 1:
        raise ApiError(400, f"{' and '.join(given)} each constrain the output: give one", param=given[1])
    if body.guided_whitespace_pattern is not None:
        raise ApiError.unsupported(
            "guided_whitespace_pattern", "set disable_any_whitespace in structured_outputs instead"
        )
    if body.guided_decoding_backend not in (None, "auto", "guidance", "llguidance"):
        raise ApiError.unsupported(
            "guided_decoding_backend", "this server guides decoding with llguidance (vLLM's guidance)"
        )
    if not given:
        return None
    (field,) = given
    try:
        if field == "response_format":
            guided = _response_format(body.response_format)
        elif field == "structured_outputs":
            guided = GuidedDecoding(**msgspec.structs.asdict(body.structured_outputs))
        else:
            guided = GuidedDecoding(**{field.removeprefix("guided_"): getattr(body, field)})
    except FieldError as error:
        raise ApiError(400, f"{field}: {error}", param=field, code="invalid_request") from None
    return guided, field


def _gives(body: Constrained, name: str) -> bool:
    value = getattr(body, name)
    if name == "response_format":
        return value is not None and value.get("type", "text") != "text"
    return value is not None


def _response_format(value: dict[str, Any]) -> GuidedDecoding:
    """OpenAI's `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
    a json_schema without a schema is any JSON object."""
    kind = value.get("type")
    if kind == "json_object":
        return GuidedDecoding(json_object=True)
    if kind != "json_schema":
        raise FieldError("response_format", f"type must be text, json_object or json_schema, got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise FieldError("response_format", "json_schema must be an object with the schema in its `schema` field")
    schema = spec.get("schema")
    if schema is None:
        return GuidedDecoding(json_object=True)
    if not isinstance(schema, dict):
        raise FieldError("response_format", f"json_schema.schema must be a JSON schema object, got {schema!r}")
    return GuidedDecoding(json=schema)


async def check_compiles(served: ServedModel | None, guided: GuidedDecoding, field: str) -> None:
    """Compiles `guided` for the graph's model in a worker thread (the engines then find it in the process's
    cache when they share it); a 400 naming `field` when it cannot compile or takes over COMPILE_LIMIT_S. Without
    the model's files here (a front end of a graph served elsewhere) the engine's own check refuses it."""
    if served is None or served.tokenizer is None or served.config is None:
        return
    from sagellm.runtime.engine.grammar import grammar_compiler  # torch and llguidance: loaded when first needed

    config = served.config

    def compile_it() -> None:
        grammar_compiler(served.tokenizer, config.vocab_size, config.eos_token_ids).compile(guided)

    try:
        with trio.move_on_after(COMPILE_LIMIT_S) as waited:
            await trio.to_thread.run_sync(compile_it, abandon_on_cancel=True)
    except FieldError as error:
        raise ApiError(400, f"{field}: {error}", param=field, code="invalid_request") from None
    if waited.cancelled_caught:
        message = f"{field}: the {guided.kind} did not compile within {COMPILE_LIMIT_S:g} s; simplify it"
        raise ApiError(400, message, param=field, code="invalid_request")
