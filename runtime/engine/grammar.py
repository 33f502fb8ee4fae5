"""Guided decoding's machinery on llguidance: a constraint (`GuidedDecoding`) compiled once per tokenizer into a
matcher, a copy of it per request that follows the request's tokens, and the mask of the tokens it may take next.

llguidance over xgrammar, both measured on SmolLM2's 49k vocabulary (benchmarks/README.md, structured output): any
schema compiles in 1-2 ms where xgrammar takes 5-7 ms and 225 ms once `format` or `pattern` appears; JSON Schema's
keywords it does not implement (`uniqueItems`, `not`, `if`) are refused by name where xgrammar ignores `allOf` and
`uniqueItems` silently; special tokens cannot appear inside JSON strings; and it has no dependencies (xgrammar pulls
triton, ~1 GB, into a CPU install). A mask costs ~13 us (xgrammar ~2 us): noise beside a model step. Masks are
bit-packed int32 rows; `mask_logits` applies them to a batch's logits.

Compiled matchers are kept per constraint (a copy per request costs ~40 us), and one compiler serves every engine
and the gateway's admission check of a process that share a tokenizer (`grammar_compiler`). A constraint that does
not compile raises a `FieldError` naming its field. JSON is laid out compactly (`{"a": 1, "b": [2, 3]}`) unless a
request asks for free whitespace: a small model given newlines to choose from fills objects with them.

A constraint no output can meet is refused when it compiles, not found while decoding: llguidance compiles lazily, so
a `$ref` loop, a grammar whose rules never end or a regex matching nothing compiles, and fails at its first mask; a
schema whose required property refers back to itself fails at the token after its forced start (`{`). Compiling
walks that start (`_first_dead_end`). Where emptiness shows only later, or only with the request's own restrictions
(`allowed_token_ids`, `bad_words`, `min_tokens`), the engine asks the matcher why no token followed
(`GuidedMatcher.dead_end`) and ends that request alone."""

from __future__ import annotations

import json
import math
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.guided_params import COMPACT_JSON, GuidedDecoding
from sagellm.runtime.engine.penalties import TokenHistory, adjust_logits
from sagellm.runtime.engine.sampling_params import SamplingParams

RESTRICTIONS = ("allowed_token_ids", "bad_words", "min_tokens")  # the request fields that rule tokens out (-inf)
COMPILED_KEPT = 256  # compiled constraints kept per tokenizer, least recently used dropped first
FORCED_START_WALKED = 32  # tokens of a constraint's forced start walked at compile time, looking for a dead end
_compilers: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], GrammarCompiler]]
_compilers = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary (`vocab_size`: the model's logits width, which may be
    larger than the tokenizer's); `stop_token_ids` end a constrained output (the model's EOS tokens)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        stops = sorted(stop_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stops or None)
        self._vocab = vocab_size
        self._compiled: OrderedDict[tuple[str, str, bool | None], Any] = OrderedDict()  # a matcher, or its refusal
        self._lock = threading.Lock()

    def compile(self, guided: GuidedDecoding) -> Any:
        """The constraint's pristine matcher (llguidance's `LLMatcher`, compiled once and kept); a `FieldError`
        naming its field when it does not compile (an invalid schema, a regex or grammar with a syntax error) or no
        output can meet it (its first mask is empty, or its forced start leads nowhere)."""
        with self._lock:
            if (compiled := self._compiled.get(guided.key)) is not None:
                self._compiled.move_to_end(guided.key)
                if isinstance(compiled, FieldError):
                    raise compiled
                return compiled
        compiled = self._compile(guided)
        with self._lock:  # a refusal is kept too: finding an empty grammar can take a worker thread ~0.5 s
            self._compiled[guided.key] = compiled
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        if isinstance(compiled, FieldError):
            raise compiled
        return compiled

    def _compile(self, guided: GuidedDecoding) -> Any:
        """A matcher for `guided`, or the FieldError that refuses it."""
        try:
            matcher = self._llg.LLMatcher(self._tokenizer, self._grammar(guided), log_level=0)
        except (ValueError, TypeError) as error:
            return _refusal(guided, str(error))
        except RecursionError:  # a schema given as text, nested past Python's recursion limit
            return _refusal(guided, "it nests deeper than Python can read")
        if matcher.is_error():
            return _refusal(guided, _reason(matcher.get_error()))
        why = _first_dead_end(matcher.deep_copy(), self._vocab)
        return matcher if why is None else _refusal(guided, why)

    def matcher(self, guided: GuidedDecoding) -> GuidedMatcher:
        return GuidedMatcher(self.compile(guided).deep_copy())

    def _grammar(self, guided: GuidedDecoding) -> str:
        llg, kind = self._llg, guided.kind
        if kind in ("json", "json_object"):
            schema = _ascii_patterns(json.loads(guided.json)) if kind == "json" else {"type": "object"}
            layout = None if guided.disable_any_whitespace is False else COMPACT_JSON
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=layout)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(ascii_digits(guided.regex))
        if kind == "choice":
            return llg.grammar_from("choice", json.dumps(guided.choice))
        return llg.grammar_from("grammar", guided.grammar)  # Lark, or GBNF (llama.cpp's)


class GuidedMatcher:
    """One request's place in its grammar: which tokens may come next (`fill`), and the tokens that came
    (`accept`). `terminated` once nothing more can follow (a stop token came, or the grammar is complete and takes
    no more: the output ends there, without a stop token)."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill(self, masks: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into row `row` of `masks` (`new_masks`)."""
        view = masks[row]
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def accept(self, token: int) -> bool:
        """Moves past `token`; False when the grammar does not allow it. The matcher then stays where it was, so
        `may_end` and `dead_end` can say why, unless llguidance gave up on the grammar (`dead_end` says so)."""
        return self._matcher.try_consume_tokens([token]) == 1

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_stopped())

    @property
    def may_end(self) -> bool:
        """The output so far is a whole instance of the constraint: it may end here."""
        return not self._matcher.is_error() and bool(self._matcher.is_accepting())

    def dead_end(self, params: SamplingParams) -> str:
        """Why no token could follow the output so far, after `accept` refused one: a token outside the mask is
        drawn only when the request's own restrictions (`params`') ruled out every token the constraint allows, or
        when llguidance gave up on the grammar (a limit its parser hit: a constraint with no finite instance)."""
        kind, named = _kind(params), _restrictions(params)
        if self._matcher.is_error():
            return f"{kind}: the output so far cannot go on: {_reason(self._matcher.get_error())}"
        if not named:
            return f"{kind}: no token it allows next could be drawn"
        return f"{kind}: no token can follow the output so far: {_ruled_out(kind, named, 'next')}"

    def allowed_tokens(self, vocab_size: int) -> np.ndarray:
        """The ids of the tokens the constraint allows next, ascending (int64 [A]); in numpy, whose ops stay fast on
        busy cores (see `mask_logits`)."""
        masks = new_masks(1, vocab_size)
        self.fill(masks, 0)
        return np.flatnonzero(np.unpackbits(masks.numpy().view(np.uint8), count=vocab_size, bitorder="little"))


def grammar_compiler(tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> GrammarCompiler:
    """The process's one compiler for this tokenizer and vocabulary (made on first use: reading the tokenizer's
    vocabulary takes ~350 ms), so engines and the gateway's check share compiled constraints."""
    stops = tuple(sorted(stop_token_ids))
    with _compilers_lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        compiler = per_tokenizer.get((vocab_size, stops))
        if compiler is None:
            compiler = per_tokenizer[(vocab_size, stops)] = GrammarCompiler(tokenizer, vocab_size, stops)
        return compiler


def new_masks(rows: int, vocab_size: int) -> torch.Tensor:
    """Bit-packed masks for `rows` rows, every token allowed: int32 [rows, ceil(vocab_size / 32)]."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def mask_logits(logits: torch.Tensor, masks: torch.Tensor, rows: list[int]) -> None:
    """Sets to -inf, in place, the logits of the tokens `masks` (one row per entry of `rows`) does not allow in
    those rows of `logits` [N, V]. On CPU in numpy, row by row: ~0.5 ms for 16 rows of 49k, where torch's
    element-wise ops take ~1 ms on one thread and far longer on threads that share busy cores."""
    vocab = logits.shape[1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        disallowed = np.unpackbits(masks.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little") == 0
        view = logits.numpy()
        for i, row in enumerate(rows):
            np.copyto(view[row], -np.inf, where=disallowed[i])
        return
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((masks.to(logits.device).unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]  # [R, V]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def restrictions_refusal(
    matcher: GuidedMatcher, params: SamplingParams, history: TokenHistory, eos_token_ids: Iterable[int], vocab: int
) -> str | None:
    """Why the request's own restrictions (RESTRICTIONS) leave no token its constraint allows to start the output
    (`matcher` and `history`: where it starts), naming those that do it alone (else all it sets); None when a token
    is left. vLLM finds out at the first token and samples from nothing; here it is a 400 before any."""
    named = _restrictions(params)
    if not named:
        return None
    eos = list(eos_token_ids)
    allowed = matcher.allowed_tokens(vocab)
    logits = torch.full((1, vocab), -math.inf)  # [1, V]: 0 where the constraint allows, what the sampler then adjusts
    logits[0, torch.from_numpy(allowed)] = 0.0
    if torch.isfinite(adjust_logits(logits, [params], [history], eos)).any():
        return None
    firsts = set(allowed.tolist())
    alone = {
        "allowed_token_ids": not firsts.intersection(params.allowed_token_ids or ()),
        "min_tokens": firsts <= {*eos, *params.stop_token_ids},
    }
    culprits = [name for name in named if alone.get(name)] or named
    return _ruled_out(_kind(params), culprits, "to start the output")


def _restrictions(params: SamplingParams) -> list[str]:
    return [name for name in RESTRICTIONS if getattr(params, name)]


def _kind(params: SamplingParams) -> str:
    return params.guided.kind if params.guided is not None else "constraint"


def _ruled_out(kind: str, culprits: list[str], where: str) -> str:
    rules = "rule" if len(culprits) > 1 else "rules"
    return f"{' and '.join(culprits)} {rules} out every token the request's {kind} allows {where}"


def ascii_digits(regex: str) -> str:
    """`regex` with `\\d` meaning [0-9], as in JSON Schema's (ECMAScript) patterns and vLLM's regexes, not any
    Unicode digit, as in llguidance's (Rust) regexes: a small model asked for a phone number otherwise picks
    'SEGMENTED DIGIT EIGHT'."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        char = regex[i]
        if char == "\\" and i + 1 < len(regex):
            pair = regex[i : i + 2]
            out.append(("0-9" if in_class else "[0-9]") if pair == "\\d" else pair)
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def _ascii_patterns(schema: Any) -> Any:
    """A JSON schema (decoded) with every `pattern` and `patternProperties` regex through `ascii_digits`."""
    if isinstance(schema, list):
        return [_ascii_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "pattern" and isinstance(value, str):
            out[key] = ascii_digits(value)
        elif key == "patternProperties" and isinstance(value, dict):
            out[key] = {ascii_digits(k): _ascii_patterns(v) for k, v in value.items()}
        else:
            out[key] = _ascii_patterns(value)
    return out


def _refusal(guided: GuidedDecoding, why: str) -> FieldError:
    return FieldError(guided.kind, f"{guided.kind} cannot be used to constrain the output: {why}")


def _first_dead_end(matcher: Any, vocab_size: int) -> str | None:
    """Why no output can meet a freshly compiled constraint, found on its forced start (at most
    FORCED_START_WALKED tokens, while the mask allows exactly one and the grammar cannot end yet); None when none
    shows there. Walks `matcher`, a copy."""
    walker = GuidedMatcher(matcher)
    for _ in range(FORCED_START_WALKED):
        allowed = walker.allowed_tokens(vocab_size)
        if matcher.is_error() or walker.may_end or len(allowed) != 1:
            break
        walker.accept(int(allowed[0]))
    return _reason(matcher.get_error()) if matcher.is_error() else None


def _reason(message: str) -> str:
    """llguidance's error on one line, without its drawings of where in the grammar (`  1 | start: ...`, `^`) and
    its dump of the parser's state; its names for a constraint with no instance said in words."""
    lines = [line.strip() for line in message.split("<state>", 1)[0].splitlines()]
    kept = [line for line in lines if line and not re.match(r"\d+ \|", line) and set(line) != {"^"}]
    why = " ".join(kept) or "no reason given"
    if why.startswith("NoExtensionBias"):  # the mask is empty: nothing at all can come next
        return "it allows no text from here on, so no output can meet it"
    if "Too many items" in why:  # its forced continuation never ends
        return (
            f"it has no finite instance: it must hold itself without end (a required property or a non-empty array "
            f"whose $ref is its own schema, a rule that always recurses) (llguidance: {why})"
        )
    return why
