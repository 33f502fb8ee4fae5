"""Sequence classifiers through `EmbeddingEngine`: a cross-encoder's pair scores equal sentence-transformers'
CrossEncoder on the same weights (its activation applied as it applies it), a classifier's label probabilities equal
`transformers`' text-classification pipeline, batched with inputs of other lengths; pairs refused by an embedding
model and bad pairs refused before any compute."""

from __future__ import annotations

import pytest
import torch

from sagellm.runtime.embedding import EmbeddingEngine, EmbeddingInputError

QUERY = "the quick brown fox"
DOCUMENTS = ["the lazy dog", "hello world !", "quick quick fox jumps over the lazy brown dog", "café"]


def _activated(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return {"sigmoid": torch.sigmoid, "softmax": lambda x: x.softmax(-1), "identity": lambda x: x}[activation](logits)


def test_pair_scores_equal_sentence_transformers_cross_encoder(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    engine = EmbeddingEngine(tiny_cross_encoder, max_batch_tokens=40)  # several batches of different lengths
    assert (engine.task, engine.dim, engine.activation) == ("classify", 1, "sigmoid")
    result = engine.embed([(QUERY, d) for d in DOCUMENTS])
    ours = _activated(result.embeddings[:, 0], engine.activation)
    theirs = CrossEncoder(str(tiny_cross_encoder), device="cpu").predict([(QUERY, d) for d in DOCUMENTS])
    torch.testing.assert_close(ours, torch.as_tensor(theirs), rtol=0, atol=1e-5)
    assert len(set(ours.tolist())) == len(DOCUMENTS)  # the documents are told apart
    tokenized = engine.tokenizer(QUERY, DOCUMENTS[0])["input_ids"]
    assert result.prompt_tokens[0] == len(tokenized)


def test_classifier_probabilities_equal_the_transformers_pipeline(tiny_classifier):
    from transformers import pipeline

    engine = EmbeddingEngine(tiny_classifier)
    assert (engine.task, engine.labels, engine.activation) == (
        "classify",
        ("negative", "neutral", "positive"),
        "identity",
    )
    probs = engine.embed(DOCUMENTS).embeddings.softmax(-1)
    classify = pipeline("text-classification", model=str(tiny_classifier), device="cpu", top_k=None)
    for row, scores in zip(probs, classify(DOCUMENTS)):
        theirs = torch.tensor([next(s["score"] for s in scores if s["label"] == label) for label in engine.labels])
        torch.testing.assert_close(row, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [([(QUERY, "")], r"^input 0 is an empty string"), ([(" ".join(["fox"] * 80), "dog")], r"^input 0 has \d+ tokens")],
)
def test_bad_pairs_are_refused_before_any_compute(tiny_cross_encoder, inputs, message):
    with pytest.raises(EmbeddingInputError, match=message):
        EmbeddingEngine(tiny_cross_encoder).embed(inputs)


def test_an_embedding_model_refuses_pairs(tiny_st_model):
    with pytest.raises(EmbeddingInputError, match="pairs of texts are scored by a cross-encoder"):
        EmbeddingEngine(tiny_st_model).embed([(QUERY, "dog")])
