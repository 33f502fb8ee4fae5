"""The RAG app in SAGE (`examples/sage_rag.py`) end to end on real models: a small corpus indexed by a SAGE job
(chunks embedded by the `embedding` operator as a SAGE service, all-MiniLM-L6-v2, into FAISS), then `graphs/rag.yaml`
as a SAGE job (rag_retrieve, admission, policy queue, route, SmolLM2-135M-Instruct) answers known questions; the
retrieval must find each question's document, and every answer comes with the sources it was given."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "rag" / "corpus"
QUESTIONS = {  # question -> the one document that answers it
    "How much money can I spend on food per day during a work trip?": "travel-policy",
    "How many points is each lighthouse worth?": "harbor-lights-rules",
    "What kind of water should I give my calathea?": "calathea-care",
    "On which day is the blue recycling bin picked up?": "riverton-recycling",
    "How often should I feed a starter kept in the refrigerator?": "sourdough-starter",
    "How much is the fine for returning a book late?": "library-borrowing",
}

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    spec = importlib.util.spec_from_file_location("sage_rag", ROOT / "examples" / "sage_rag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAGELLM_HOME", str(tmp_path_factory.mktemp("rag-home")))
        yield module


def test_a_sage_rag_app_answers_from_the_right_documents(app) -> None:
    documents = {path.stem: path.read_text() for path in sorted(CORPUS.glob("*.md"))}
    folder = app.index_documents("corpus", documents)
    assert (folder / "index.faiss").is_file() and folder.name == "corpus"
    replies = app.answer(folder, list(QUESTIONS), max_tokens=48)
    top = [reply["sources"][0]["document_id"] for reply in replies]
    right = sum(doc == QUESTIONS[reply["question"]] for doc, reply in zip(top, replies))
    assert right == len(QUESTIONS), list(zip(QUESTIONS.values(), top))  # retrieval precision@1 over the questions
    for reply in replies:
        assert reply["answer"].strip(), reply
        assert [s["number"] for s in reply["sources"]] == list(range(1, len(reply["sources"]) + 1))
