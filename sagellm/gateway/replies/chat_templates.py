"""Which chat template a chat with the graph's model is rendered with: the model's own when its tokenizer brings one
(used as it is), else one the gateway ships for its family. gpt-oss speaks only Harmony, so a gpt-oss model without a
template of its own (a converted or bare checkpoint) gets `harmony_template.jinja` for every chat, tools or not; any
other model without one renders nothing (its chats are refused by admission, naming the missing template). Tools a
ChatML model's template ignores get their own fallback (`tool_parsers.FALLBACK_TEMPLATE`, chosen by `tools.plan`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Package data: read here, so a wheel without it fails at import rather than at a gpt-oss model's first chat.
HARMONY_TEMPLATE = Path(__file__).with_name("harmony_template.jinja").read_text(encoding="utf-8")
HARMONY_ARCHITECTURES = frozenset({"gpt_oss"})  # ModelConfig.architecture (Hugging Face's model_type) of gpt-oss
REASONING_EFFORTS = ("low", "medium", "high")  # what Harmony's system message says (`Reasoning: ...`)


def speaks_harmony(config: Any) -> bool:
    """Whether the model (its `ModelConfig`, or a Hugging Face config) is one of gpt-oss's family."""
    kind = getattr(config, "architecture", None) or getattr(config, "model_type", None)
    return kind in HARMONY_ARCHITECTURES


def fallback_template(tokenizer: Any, config: Any) -> str | None:
    """The template the gateway renders the model's chats with in place of the tokenizer's: Harmony's for a gpt-oss
    model whose tokenizer has none; None when the model's own serves (or nothing would)."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None):
        return None
    return HARMONY_TEMPLATE if speaks_harmony(config) else None


def rendering_template(tokenizer: Any, config: Any) -> str:
    """The template the model's chats are rendered with ("" when none): its own, else the fallback."""
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return own or fallback_template(tokenizer, config) or ""


def takes_reasoning_effort(template: str | None) -> bool:
    """Whether rendering with `template` honours a `reasoning_effort` (Harmony's, gpt-oss's own template: both read
    the variable); a template that never reads it would drop the effort without a word."""
    return bool(template) and "reasoning_effort" in template
