"""A decoder used as a reranker (Qwen3-Reranker, bge-reranker-v2-gemma): a causal language model asked whether a
document answers a query, its relevance the logit of "yes" less that of "no" at the last token. Scored as
sentence-transformers' CrossEncoder scores a causal LM, so the two agree on the same weights:

- a pair is rendered by the model's chat template as a `query` message and a `document` message (the reranker's
  template writes the instruction, the two texts and the start of the answer around them); a model with a chat
  template that drops either message (an ordinary chat model's) is refused at load, as CrossEncoder refuses it; a
  model with no chat template joins the two texts as its tokenizer joins a pair;
- the tokens are the LogitScore module's (modules.json), else the vocabulary's "yes" and "no";
- a rendered pair over the model's length loses the end of what it holds and keeps the template's tail (the tokens
  after the document, which end where the model answers), as CrossEncoder cuts it.

Batches are padded on the left, so the last position is every row's last token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sagellm.runtime.models.loaded import ModelLoadError, describe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Model types whose templates take a message's content as a string though they name `.type` (sentence-transformers'
# list); other templates that index content or name a part's type take a list of typed parts.
_FLAT_MODEL_TYPES = frozenset({"apertus", "deepseek_v3", "gpt_oss", "minicpm3", "seed_oss"})
_STRUCTURED_MARKS = ("content[0]", ".type", "'type'", '"type"', "item.type", "message.content[")
_PROBE_A, _PROBE_B = "0", "1 2 3 4"  # two contents that tokenize differently: what renders alike is the template's


@dataclass(frozen=True)
class CausalScoring:
    true_id: int
    false_id: int | None  # None: the score is the true token's logit alone
    templated: bool  # pairs rendered by the chat template (else joined as the tokenizer joins two texts)
    structured: bool  # the template takes content as [{"type": "text", "text": ...}]
    suffix: tuple[int, ...]  # the template's tokens after the document, kept when a pair is cut

    def render(self, tokenizer: PreTrainedTokenizerBase, query: str, document: str) -> list[int]:
        """The pair's token ids as the chat template renders it (its own special tokens, none added)."""
        return _render(tokenizer, self._messages(query, document))

    def cut(self, ids: list[int], max_length: int) -> list[int]:
        """`ids` within `max_length`: the rendered pair's start, then the template's tail."""
        if len(ids) <= max_length:
            return ids
        keep = min(len(self.suffix), max_length)
        return ids[: max_length - keep] + list(self.suffix[len(self.suffix) - keep :])

    def _messages(self, query: str, document: str) -> list[dict[str, Any]]:
        def content(text: str) -> Any:
            return [{"type": "text", "text": text}] if self.structured else text

        return [{"role": "query", "content": content(query)}, {"role": "document", "content": content(document)}]


def causal_scoring(
    tokenizer: PreTrainedTokenizerBase, model_type: str, tokens: tuple[int, int | None] | None, where: str
) -> CausalScoring:
    """How this decoder scores a pair; a ModelLoadError (naming `where`) when it cannot: no yes/no tokens, or a
    chat template that does not render a query and a document."""
    if tokens is None:
        vocab = tokenizer.get_vocab()
        if "yes" not in vocab or "no" not in vocab:
            raise ModelLoadError(
                f"{where}: a causal LM serves here only as a reranker, scored by its 'yes' and 'no' tokens, which "
                "its vocabulary lacks (a LogitScore module in modules.json names others); embeddings need a "
                "BERT-style encoder such as all-minilm-l6-v2"
            )
        tokens = (vocab["yes"], vocab["no"])
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return CausalScoring(*tokens, templated=False, structured=False, suffix=())
    structured = model_type not in _FLAT_MODEL_TYPES and any(mark in template for mark in _STRUCTURED_MARKS)
    scoring = CausalScoring(*tokens, templated=True, structured=structured, suffix=())
    try:
        base, other_query, other_document, long = (
            scoring.render(tokenizer, q, d)
            for q, d in ((_PROBE_A, _PROBE_A), (_PROBE_B, _PROBE_A), (_PROBE_A, _PROBE_B), (_PROBE_B, _PROBE_B))
        )
    except Exception as error:  # a template raises what its author wrote: each is reported alike
        message = f"{where}: its chat template cannot render a query and a document: {describe(error)}"
        raise ModelLoadError(message) from error
    if base in (other_query, other_document):
        raise ModelLoadError(
            f"{where}: its chat template drops the query or the document (an ordinary chat model's template?); a "
            "decoder reranker needs one that renders 'query' and 'document' messages, e.g. a chat_template.jinja "
            "beside its weights"
        )
    return CausalScoring(*tokens, templated=True, structured=structured, suffix=_common_tail(base, long))


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(tokenizer(str(text), add_special_tokens=False, verbose=False)["input_ids"])


def _common_tail(first: list[int], second: list[int]) -> tuple[int, ...]:
    """The longest token run both renders end with (the template's tail), or none when they never differ."""
    count = 0
    for left, right in zip(reversed(first), reversed(second)):
        if left != right:
            break
        count += 1
    return tuple(first[len(first) - count :]) if 0 < count < min(len(first), len(second)) else ()


@torch.inference_mode()
def causal_scores(model: PreTrainedModel, batch: list[list[int]], pad_id: int, scoring: CausalScoring) -> torch.Tensor:
    """[B, 1] logit(true) - logit(false) at each row's last token, the rows padded on the left."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros_like(input_ids)  # [B, T]
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()  # [B, V]
    scores = logits[:, scoring.true_id]  # [B]
    if scoring.false_id is not None:
        scores = scores - logits[:, scoring.false_id]
    return scores.unsqueeze(1)  # [B, 1]
