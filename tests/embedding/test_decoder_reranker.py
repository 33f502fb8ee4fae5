"""A decoder as a reranker (Qwen3-Reranker's shape) through `EmbeddingEngine`, against sentence-transformers'
CrossEncoder on the same weights (1e-4): a tiny random Qwen3ForCausalLM whose tokenizer has "yes" and "no" and a
chat template that renders a query and a document, as Qwen3-Reranker's does; pairs batched with pairs of other
lengths; pairs over the model's length cut as CrossEncoder cuts them (the template's tail kept); a model with no
chat template (the two texts joined); LogitScore's own tokens from modules.json; and a chat model's ordinary
template refused at load, as CrossEncoder refuses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sagellm.runtime.embedding import EmbeddingEngine
from sagellm.runtime.models.loaded import ModelLoadError
from tests.embedding.conftest import make_tiny_reranker

QUERY = "what is the capital of France?"
DOCUMENTS = ["Paris is the capital.", "the lazy dog", "Hello world! How are you today? I am fine, thank you.", "café"]


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_reranker(tmp_path_factory.mktemp("qwen3-reranker"))


def _scores(engine: EmbeddingEngine, pairs: list[tuple[str, str]], truncate: bool = False) -> torch.Tensor:
    assert (engine.task, engine.dim, engine.activation) == ("classify", 1, "sigmoid")
    return torch.sigmoid(engine.embed(pairs, truncate=truncate).embeddings[:, 0])


def _cross_encoder(path: Path, **kwargs: object) -> object:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(path), device="cpu", **kwargs)


def test_pair_scores_equal_cross_encoder_in_batches_of_other_lengths(tiny_reranker):
    pairs = [(QUERY, d) for d in DOCUMENTS]
    ours = _scores(EmbeddingEngine(tiny_reranker, max_batch_tokens=200), pairs)  # several batches
    theirs = torch.as_tensor(_cross_encoder(tiny_reranker).predict(pairs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert len({round(s, 6) for s in ours.tolist()}) == len(DOCUMENTS)  # the documents are told apart


def test_a_pair_over_the_length_keeps_the_templates_tail_as_cross_encoder_does(tiny_reranker, tmp_path):
    model = Path(shutil.copytree(tiny_reranker, tmp_path / "short"))
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 90}))
    engine = EmbeddingEngine(model)
    long_document = " ".join(DOCUMENTS * 4)
    pairs = [(QUERY, long_document), (QUERY, DOCUMENTS[0])]
    assert len(engine.tokenizer(long_document)["input_ids"]) > 90
    ours = _scores(engine, pairs, truncate=True)
    theirs = torch.as_tensor(_cross_encoder(model, max_length=90).predict(pairs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert engine.embed(pairs, truncate=True).prompt_tokens[0] == 90


def test_without_a_chat_template_the_texts_are_joined_as_cross_encoder_joins_them(tmp_path):
    model = make_tiny_reranker(tmp_path / "plain", template=None)
    pairs = [(QUERY, d) for d in DOCUMENTS]
    ours = _scores(EmbeddingEngine(model), pairs)
    torch.testing.assert_close(ours, torch.as_tensor(_cross_encoder(model).predict(pairs)), rtol=0, atol=1e-4)


def test_logit_score_tokens_come_from_modules_json(tiny_reranker, tmp_path):
    """A CrossEncoder saved with its LogitScore on other tokens (the true token's logit alone) loads with them."""
    saved = _cross_encoder(tiny_reranker)
    saved[1].true_token_id, saved[1].false_token_id = 40, None
    saved.save(str(tmp_path / "saved"))
    pairs = [(QUERY, d) for d in DOCUMENTS]
    ours = _scores(EmbeddingEngine(tmp_path / "saved"), pairs)
    theirs = torch.as_tensor(_cross_encoder(tmp_path / "saved").predict(pairs))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_a_chat_models_ordinary_template_is_refused_at_load(tmp_path):
    user_turns_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    model = make_tiny_reranker(tmp_path / "chat", template=user_turns_only)
    with pytest.raises(ModelLoadError, match="drops the query or the document"):
        EmbeddingEngine(model)
