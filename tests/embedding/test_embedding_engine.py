"""EmbeddingEngine on tiny random BERTs: vectors equal a by-hand pooling of `transformers`' own output for each
text run alone (so length batching and padding change nothing), every pooling mode and format the spec reads,
token counts, token-id inputs, and the one-line errors for bad inputs and bad model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sagellm.runtime.embedding import EmbeddingEngine, EmbeddingInputError, EmbeddingResult, InputTooLongError
from sagellm.runtime.embedding.engine import _length_batches
from sagellm.runtime.models.loaded import ModelLoadError
from tests.embedding.conftest import MAX_SEQ_LENGTH, write_sentence_transformers_files
from tests.tiny_models import make_tiny_llama

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "Hello!",
    "café 你好 world.",
    "a",
    "the lazy dog sleeps 42 hours",
]


def oracle(model_dir: Path, texts: list[str], modes: tuple[str, ...] = ("mean",), normalize: bool = True):
    """Each text alone through transformers' BertModel (no padding), pooled and normalized by hand."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    vectors = []
    with torch.no_grad():
        for text in texts:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]  # [T, H]
            pooled = {
                "cls": hidden[0],
                "max": hidden.amax(dim=0),
                "mean": hidden.mean(dim=0),
                "mean_sqrt_len_tokens": hidden.sum(dim=0) / len(hidden) ** 0.5,
            }
            vectors.append(torch.cat([pooled[m] for m in modes]))
    stacked = torch.stack(vectors)  # [N, D]
    return F.normalize(stacked, dim=-1) if normalize else stacked


def test_vectors_equal_transformers_mean_pooled_and_normalized(tiny_st_model: Path) -> None:
    engine = EmbeddingEngine(tiny_st_model)
    result = engine.embed(TEXTS)
    assert isinstance(result, EmbeddingResult)
    assert result.embeddings.shape == (len(TEXTS), 32) and result.embeddings.dtype == torch.float32
    torch.testing.assert_close(result.embeddings, oracle(tiny_st_model, TEXTS), atol=1e-5, rtol=1e-5)
    assert torch.allclose(result.embeddings.norm(dim=-1), torch.ones(len(TEXTS)))
    assert (engine.name, engine.dim, engine.max_length, engine.normalized) == ("tiny-st", 32, MAX_SEQ_LENGTH, True)


def test_token_counts_and_token_id_inputs(tiny_st_model: Path) -> None:
    engine = EmbeddingEngine(tiny_st_model)
    ids = [engine.tokenizer(text)["input_ids"] for text in TEXTS]
    by_text = engine.embed(TEXTS)
    assert by_text.prompt_tokens == [len(i) for i in ids] and by_text.total_tokens == sum(map(len, ids))
    by_ids = engine.embed(ids)
    assert by_ids.prompt_tokens == by_text.prompt_tokens
    torch.testing.assert_close(by_ids.embeddings, by_text.embeddings)


def test_length_batching_changes_nothing_and_pads_only_within_a_batch(tiny_st_model: Path) -> None:
    texts = TEXTS * 3
    one_batch = EmbeddingEngine(tiny_st_model).embed(texts).embeddings
    one_each = EmbeddingEngine(tiny_st_model, max_batch_tokens=1).embed(texts).embeddings
    torch.testing.assert_close(one_each, one_batch, atol=1e-5, rtol=1e-5)
    # Longest first; the long input gets a batch of its own instead of padding the short ones to its length.
    assert _length_batches([3, 20, 4, 3], max_batch_tokens=20) == [[1], [2, 0, 3]]
    assert _length_batches([5, 5, 5], max_batch_tokens=10) == [[0, 1], [2]]


@pytest.mark.parametrize(
    ("pooling", "legacy", "normalize"),
    [
        ("cls", True, False),
        (["cls", "max", "mean"], True, True),
        (["max", "mean_sqrt_len_tokens"], False, True),
        ("mean", False, False),
    ],
)
def test_pooling_modes(tiny_bert: Path, tmp_path: Path, pooling: str | list[str], legacy: bool, normalize: bool):
    model_dir = write_sentence_transformers_files(
        Path(shutil.copytree(tiny_bert, tmp_path / "m")), pooling, normalize=normalize, legacy=legacy
    )
    engine = EmbeddingEngine(model_dir)
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    assert engine.dim == 32 * len(modes) and engine.normalized == normalize
    expected = oracle(tiny_bert, TEXTS, modes, normalize)
    torch.testing.assert_close(engine.embed(TEXTS).embeddings, expected, atol=1e-5, rtol=1e-5)


def test_plain_hugging_face_encoder_is_mean_pooled_unnormalized(tiny_bert: Path) -> None:
    engine = EmbeddingEngine(tiny_bert)
    assert engine.max_length == 64  # the position table: the tokenizer sets no limit
    torch.testing.assert_close(engine.embed(TEXTS).embeddings, oracle(tiny_bert, TEXTS, normalize=False))


def test_bad_inputs_are_value_errors_naming_the_input(tiny_st_model: Path) -> None:
    engine = EmbeddingEngine(tiny_st_model)
    too_long = " ".join(["fox"] * (MAX_SEQ_LENGTH - 1))  # 23 words + [CLS] + [SEP] = 25 tokens
    with pytest.raises(InputTooLongError, match=r"^input 1 has 25 tokens, more than this model's limit of 24;") as e:
        engine.embed(["fox", too_long])
    assert (e.value.index, e.value.num_tokens, e.value.limit) == (1, 25, MAX_SEQ_LENGTH)
    assert isinstance(e.value, ValueError)
    assert engine.embed([" ".join(["fox"] * (MAX_SEQ_LENGTH - 2))]).prompt_tokens == [MAX_SEQ_LENGTH]  # at the limit
    with pytest.raises(InputTooLongError, match=r"^input 0 has 25 tokens"):
        engine.embed([[5] * 25])
    cases = [
        (["fox", ""], r"^input 1 is an empty string", 1),
        ([], r"^no inputs", None),
        ([[2, 3], []], r"^input 1 is an empty token list", 1),
        ([[2, 10_000, 3]], r"^input 0 has token ids outside the vocabulary \[0, \d+\)", 0),
        ([[2, -1, 3]], r"^input 0 has token ids outside", 0),
    ]
    for inputs, message, index in cases:
        with pytest.raises(EmbeddingInputError, match=message) as e:
            engine.embed(inputs)
        assert e.value.index == index and not isinstance(e.value, InputTooLongError)
    with pytest.raises(TypeError, match=r"wrap a single text as \[text\]"):
        engine.embed("fox")  # type: ignore[arg-type]


def test_bad_model_directories_are_one_line_load_errors(tmp_path: Path, tiny_bert: Path) -> None:
    def load_error(path: Path) -> str:
        with pytest.raises(ModelLoadError) as e:
            EmbeddingEngine(path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "no such file or directory" in load_error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert load_error(tmp_path / "empty") == f"{tmp_path / 'empty'}: not a model directory (no config.json)"
    (tmp_path / "file.bin").write_bytes(b"x")
    assert load_error(tmp_path / "file.bin").endswith(
        "not a directory; pass a sentence-transformers or Hugging Face encoder"
    )
    llama = make_tiny_llama(tmp_path / "llama")
    assert load_error(llama) == (
        f"{llama}: a causal LM serves here only as a reranker, scored by its 'yes' and 'no' tokens, which its "
        "vocabulary lacks (a LogitScore module in modules.json names others); embeddings need a BERT-style encoder "
        "such as all-minilm-l6-v2"
    )

    no_weights = Path(shutil.copytree(tiny_bert, tmp_path / "no-weights"))
    (no_weights / "model.safetensors").unlink()
    assert load_error(no_weights).startswith(f"{no_weights}: cannot load the encoder weights: ")

    dense = write_sentence_transformers_files(Path(shutil.copytree(tiny_bert, tmp_path / "dense")))
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    assert load_error(dense).endswith(
        "modules Transformer, Pooling, Dense, Normalize are not supported; expected Transformer, Pooling[, Normalize]"
        " or Transformer, LogitScore"
    )

    last_token = write_sentence_transformers_files(
        Path(shutil.copytree(tiny_bert, tmp_path / "last")), "lasttoken", legacy=False
    )
    assert load_error(last_token) == (
        f"{last_token / '1_Pooling' / 'config.json'}: pooling lasttoken is not supported "
        "(supported: cls, max, mean, mean_sqrt_len_tokens)"
    )
