"""What a request's output is constrained to: a JSON schema, any JSON object, a regular expression, one of a few
strings, or a grammar (EBNF as llama.cpp writes it, GBNF, or Lark).

The fields are vLLM's (`GuidedDecodingParams`, later `StructuredOutputsParams`): `json`, `json_object`, `regex`,
`choice`, `grammar`, `disable_any_whitespace`, so a vLLM program's constraint maps over one to one. Exactly one kind
is given; its shape is checked here, when the request enters (a `ValueError` naming the field), and whether it
compiles is the grammar compiler's to say (`runtime.engine.grammar`). A JSON schema given as a dict is kept as its
JSON text: the key the compiled grammars are cached by, and what crosses the wire to other processes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sagellm.common.errors import FieldError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Compact JSON in llguidance's terms (its schema overrides, and `x-guidance` inside a schema): a space after each ','
# and ':' and no other whitespace. The layout `disable_any_whitespace` chooses, and forced tool calls use.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SPEC_CHARS = 200_000  # a schema or grammar longer than this is refused before any compiler sees it


@dataclass
class GuidedDecoding:
    json: str | dict[str, Any] | None = None  # a JSON schema (its text, or the decoded dict)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # EBNF (GBNF); Lark when it says so with a `start:` rule
    # vLLM's switch for JSON's layout. Unset or true: compact, a space after each ',' and ':' and no other
    # whitespace (a small model given newlines to choose from fills objects with them); false: any whitespace.
    disable_any_whitespace: bool | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            why = f"got {', '.join(given)}" if given else "got none"
            raise FieldError("guided", f"give exactly one of {', '.join(KINDS)} to constrain the output; {why}")
        (self.kind,) = given
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json)
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise FieldError(name, f"{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (
            not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise FieldError("choice", f"choice must be a non-empty list of strings, got {self.choice!r}")
        if not isinstance(self.json_object, bool) or self.disable_any_whitespace not in (None, True, False):
            raise FieldError("guided", "json_object and disable_any_whitespace must be booleans")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise FieldError(self.kind, f"{self.kind} has {len(self.spec)} characters, more than {MAX_SPEC_CHARS}")

    @property
    def spec(self) -> str:
        """The constraint as text: with `kind` and `disable_any_whitespace`, what identifies its compiled grammar."""
        value = getattr(self, self.kind)
        return json.dumps(value) if isinstance(value, (list, bool)) else value

    @property
    def key(self) -> tuple[str, str, bool | None]:
        return self.kind, self.spec, self.disable_any_whitespace
