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


# The media parts as template_messages writes them, by kind
MEDIA_PARTS = {"image": {"type": "image"}, "audio": {"type": "audio", "audio": None}}


def media_placeholders(tokenizer: Any) -> dict[str, str]:
    """What the model's own template writes for each kind of media part (Qwen-VL's
    `<|vision_start|><|image_pad|><|vision_end|>`, LLaVA's `<image>`), found by rendering a turn with the part between
    two texts: the fallback tool template (tool_template.jinja) writes the same where it renders media, so a chat
    with tools and pictures reaches the encoder as the model's own template would have it. Kinds the template does
    not render are left out."""
    found = {}
    for kind, part in MEDIA_PARTS.items():
        turn = [{"role": "user", "content": [{"type": "text", "text": "\x01"}, part, {"type": "text", "text": "\x02"}]}]
        try:
            text = tokenizer.apply_chat_template(turn, tokenize=False)
        except Exception:  # noqa: BLE001 -- a template that cannot render the part: no placeholder for it
            continue
        before, _, rest = text.partition("\x01")
        written, marked, _ = rest.partition("\x02")
        if marked and written:
            found[kind] = written
    return found
