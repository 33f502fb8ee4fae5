"""Retrieval end to end on real parts: the corpus in `corpus/` (eight short documents on unrelated subjects) chunked
with all-MiniLM-L6-v2's own tokenizer, embedded by our EmbeddingEngine on the real model, indexed in FAISS; known
questions, each answered by exactly one document, must find that document; the index survives a save and load and
forgets a removed document; and the prompt numbers the sources it was given and fits its budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sagellm.runtime.embedding.engine import EmbeddingEngine
from sagellm.runtime.models.model_cache import DEFAULT_EMBEDDING_MODEL, resolve_model
from sagellm.runtime.rag import (
    DEFAULT_MAX_TOKENS,
    Chunk,
    Hit,
    TokenCounter,
    VectorIndex,
    build_messages,
    chunk_document,
    cited_sources,
    select_sources,
)

CORPUS = Path(__file__).parent / "corpus"
# Each question's answer is in exactly one document, in the chunk holding the phrase beside it; few questions share
# a content word with their answer beyond the subject's name.
QUESTIONS = {
    "How much money can I spend on food per day during a work trip?": ("travel-policy", "55 euros"),
    "Am I allowed to fly business class to a meeting?": ("travel-policy", "business class needs written approval"),
    "How many points is each lighthouse worth?": ("harbor-lights-rules", "scores three"),
    "What happens when two ships stop on the same tile?": ("harbor-lights-rules", "they collide"),
    "Why are the leaves of my calathea curling?": ("calathea-care", "curl inwards"),
    "What kind of water should I give my calathea?": ("calathea-care", "filtered water"),
    "On which day is the blue recycling bin picked up?": ("riverton-recycling", "every second Tuesday"),
    "Where do I take empty glass jars?": ("riverton-recycling", "bottle banks"),
    "What is the grey liquid on top of my sourdough starter?": ("sourdough-starter", "called hooch"),
    "How often should I feed a starter kept in the refrigerator?": ("sourdough-starter", "feed it once a week"),
    "How do I know when my bike chain is worn out?": ("bike-chain", "chain checker"),
    "How long can I keep a DVD I borrowed?": ("library-borrowing", "DVDs and video games are lent for one week"),
    "How much is the fine for returning a book late?": ("library-borrowing", "25 cents per day"),
    "When should I put a honey super on the hive?": ("spring-beekeeping", "Add a super"),
    "How can I tell that my bees are about to swarm?": ("spring-beekeeping", "preparing to swarm"),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddingEngine]:
    """The real all-MiniLM-L6-v2, fetched through the model cache into this module's own SAGELLM_HOME."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAGELLM_HOME", str(tmp_path_factory.mktemp("sagellm-home")))
        yield EmbeddingEngine(resolve_model(DEFAULT_EMBEDDING_MODEL), name=DEFAULT_EMBEDDING_MODEL)


@pytest.fixture(scope="module")
def corpus_index(engine: EmbeddingEngine) -> VectorIndex:
    index = VectorIndex("corpus", engine.dim)
    for path in sorted(CORPUS.glob("*.md")):
        chunks = chunk_document(path.stem, path.read_text(), model_tokens(engine))
        index.add(path.stem, chunks, engine.embed([chunk.text for chunk in chunks]).embeddings)
    return index


def model_tokens(engine: EmbeddingEngine) -> TokenCounter:
    """The embedding model's own count, [CLS] and [SEP] included: what its 256-token limit counts."""
    return lambda text: len(engine.tokenizer(text)["input_ids"])


def search(engine: EmbeddingEngine, index: VectorIndex, question: str, k: int) -> list[Hit]:
    return index.search(engine.embed([question]).embeddings[0], k)


@pytest.mark.network
@pytest.mark.slow
def test_the_corpus_is_chunked_within_the_models_limit(engine: EmbeddingEngine, corpus_index: VectorIndex) -> None:
    """The corpus' sections are short, so each is one chunk, heading first, well within the model's 256 tokens."""
    chunks = [
        chunk
        for path in sorted(CORPUS.glob("*.md"))
        for chunk in chunk_document(path.stem, path.read_text(), model_tokens(engine))
    ]
    assert corpus_index.documents() == {
        document: sum(chunk.document_id == document for chunk in chunks) for document, _ in QUESTIONS.values()
    }
    assert len(corpus_index.documents()) == 8 and len(corpus_index) == len(chunks) == 32
    assert all(chunk.text.startswith("#") and chunk.text.count("\n#") == 0 for chunk in chunks)
    assert max(model_tokens(engine)(chunk.text) for chunk in chunks) <= DEFAULT_MAX_TOKENS < engine.max_length


@pytest.mark.network
@pytest.mark.slow
def test_known_questions_find_their_document(engine: EmbeddingEngine, corpus_index: VectorIndex) -> None:
    """Measured on this corpus: every question's document is its top hit (15/15) and the chunk with the answer is
    among the top three for 14 of 15 ("about to swarm" finds the beekeeping text's other sections first); the
    bounds leave one miss of room."""
    questions = list(QUESTIONS)
    vectors = engine.embed(questions).embeddings  # [Q, 384]
    top3 = {question: corpus_index.search(vector, k=3) for question, vector in zip(questions, vectors)}
    found = {question: [hit.chunk.document_id for hit in hits] for question, hits in top3.items()}
    misses_at_1 = {q: documents for q, documents in found.items() if documents[0] != QUESTIONS[q][0]}
    misses_at_3 = {q: documents for q, documents in found.items() if QUESTIONS[q][0] not in documents}
    answers_missed_at_3 = [q for q, hits in top3.items() if not any(QUESTIONS[q][1] in hit.chunk.text for hit in hits)]
    assert 1 - len(misses_at_1) / len(questions) >= 14 / 15, misses_at_1  # precision@1, by document
    assert misses_at_3 == {}  # recall@3 = 1.0, by document
    assert 1 - len(answers_missed_at_3) / len(questions) >= 13 / 15, answers_missed_at_3  # recall@3, by chunk


@pytest.mark.network
@pytest.mark.slow
def test_save_and_load_answer_the_same(engine: EmbeddingEngine, corpus_index: VectorIndex, tmp_path: Path) -> None:
    corpus_index.save(tmp_path / "corpus-index")
    loaded = VectorIndex.load(tmp_path / "corpus-index")
    assert (loaded.name, loaded.dim, loaded.documents()) == (corpus_index.name, 384, corpus_index.documents())
    vectors = engine.embed(list(QUESTIONS)).embeddings  # [Q, 384]
    for vector in vectors:
        assert loaded.search(vector, k=5) == corpus_index.search(vector, k=5)


@pytest.mark.network
@pytest.mark.slow
def test_a_removed_document_cannot_be_found(engine: EmbeddingEngine, corpus_index: VectorIndex, tmp_path: Path) -> None:
    corpus_index.save(tmp_path / "corpus-index")
    index = VectorIndex.load(tmp_path / "corpus-index")  # a copy: the module's index stays whole
    question = "What is the grey liquid on top of my sourdough starter?"
    assert search(engine, index, question, k=1)[0].chunk.document_id == "sourdough-starter"
    assert index.remove("sourdough-starter") == corpus_index.documents()["sourdough-starter"]
    hits = search(engine, index, question, k=len(index))
    assert len(hits) == len(index) == len(corpus_index) - corpus_index.documents()["sourdough-starter"]
    assert "sourdough-starter" not in {hit.chunk.document_id for hit in hits}


@pytest.mark.network
@pytest.mark.slow
def test_the_prompt_cites_what_was_found(engine: EmbeddingEngine, corpus_index: VectorIndex) -> None:
    question = "How much money can I spend on food per day during a work trip?"
    hits = search(engine, corpus_index, question, k=4)
    sources = select_sources(hits, model_tokens(engine))
    assert sources == hits  # four chunks of at most 200 tokens fit the default 1,500
    system, user = build_messages(question, sources)
    assert user == {"role": "user", "content": question}
    assert system["role"] == "system"
    assert "[1] (from travel-policy)\n" in system["content"] and "55 euros" in system["content"]
    assert "cite each source you use by its number" in system["content"].lower()
    cited = cited_sources(sources)
    assert [c["number"] for c in cited] == [1, 2, 3, 4]
    assert cited[0]["document_id"] == "travel-policy" and cited[0]["score"] == hits[0].score
    assert (cited[0]["start"], cited[0]["end"]) == hits[0].chunk.span


def hit(text: str, score: float, document_id: str = "doc", ordinal: int = 0) -> Hit:
    return Hit(score, Chunk(document_id, ordinal, text, 0, len(text)))


def words(text: str) -> int:
    return len(text.split())


def test_sources_fill_the_budget_best_first() -> None:
    hits = [hit("one two three four", 0.9), hit("a b c d e f g h i j", 0.8, ordinal=1), hit("x y", 0.7, ordinal=2)]
    # Each source costs its words plus "[n] (from doc)": 3 more.
    assert select_sources(hits, words, max_tokens=19) == [hits[0], hits[2]]  # 7 + 13 > 19: the second is skipped
    assert select_sources(hits, words, max_tokens=100) == hits
    assert select_sources(hits, words, max_tokens=3) == []
    with pytest.raises(ValueError, match="max_tokens must be at least 1, not 0"):
        select_sources(hits, words, max_tokens=0)


def test_messages_number_the_sources_in_order() -> None:
    sources = [hit("Pay four gold to build.", 0.9, "game", 3), hit("Lighthouses score three.", 0.5, "game", 4)]
    system, user = build_messages("  How do I build a lighthouse? ", sources)
    assert system["content"].endswith(
        "Sources:\n\n[1] (from game)\nPay four gold to build.\n\n[2] (from game)\nLighthouses score three."
    )
    assert user == {"role": "user", "content": "How do I build a lighthouse?"}
    assert [(c["number"], c["ordinal"], c["score"]) for c in cited_sources(sources)] == [(1, 3, 0.9), (2, 4, 0.5)]


def test_no_sources_and_no_question() -> None:
    system, _ = build_messages("Anything?", [])
    assert system["content"].endswith("Sources:\n\n(no sources were found)")
    assert "say that you do not know" in system["content"]
    assert cited_sources([]) == []
    with pytest.raises(ValueError, match="the question is empty"):
        build_messages(" \n", [])
