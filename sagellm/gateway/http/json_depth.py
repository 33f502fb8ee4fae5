"""How deep a JSON body nests, measured on its bytes before it is decoded.

msgspec decodes as deep as Python's recursion limit allows from where it is called (~980 levels in a route), and the
code that later walks a body's free-form values (a schema dumped to JSON, tools rendered by a chat template, a
message's parts copied) runs some frames deeper: a body nested just below the decoder's limit then failed there, a
RecursionError answered with a 500. A fixed bound, far below both, makes the refusal a 400 that does not depend on
the stack: MAX_BODY_DEPTH levels, as serde_json's (llguidance's JSON) default, which no request of any API here needs
(OpenAI's structured outputs take 5 levels of schema, a chat's parts nest 4 deep).

Linear and in C (bytes and numpy ops: for 9 MB of small objects, ~0.7 of the time msgspec takes to decode them), and
only for a body with more brackets than the bound: a body with fewer cannot nest deeper."""

from __future__ import annotations

import numpy as np

MAX_BODY_DEPTH = 128
_QUOTE = ord('"')
_STEPS = np.zeros(256, np.int8)  # a byte's change of depth: +1 opens an array or object, -1 closes one
_STEPS[[ord("["), ord("{")]] = 1
_STEPS[[ord("]"), ord("}")]] = -1


def too_deep(body: bytes) -> int | None:
    """The depth of a body nested deeper than MAX_BODY_DEPTH, else None."""
    if body.count(b"[") + body.count(b"{") <= MAX_BODY_DEPTH:
        return None
    depth = nesting_depth(body)
    return depth if depth > MAX_BODY_DEPTH else None


def nesting_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest; brackets inside strings do not count."""
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # (escaped backslashes first: `\\"` ends a string)
    chars = np.frombuffer(unescaped, np.uint8)
    in_string = np.logical_xor.accumulate(chars == _QUOTE)  # from a string's opening quote to before its closing one
    steps = _STEPS[chars]
    moves = steps[(steps != 0) & ~in_string]  # the brackets outside strings, in order
    return int(moves.cumsum(dtype=np.int32).max(initial=0))
