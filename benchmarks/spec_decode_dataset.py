"""The echo workload of benchmarks/spec_decode.sh: a JSONL of prompts for `vllm bench serve --dataset-name custom`.

    python benchmarks/spec_decode_dataset.py OUT.jsonl [--seed N] [--prompts 8] [--tokens 512]

Each prompt asks the model to copy a ~512-token text with one word changed: the case n-gram speculation is for
(editing code or a document, quoting from the prompt), where most of the answer is already in the prompt. The texts are
English-like prose from a small grammar and a seeded `random.Random`, not random token ids: the same seed writes the
same file on any machine, and readable text is what a model can copy. SmolLM2-135M copies the first sentences or so,
then goes on in sentences of the same grammar and falls into loops of its own: n-grams of the prompt or of its answer
either way. A fresh seed per round gives prompts no server has seen (prefix caches would skip the prefill).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer

# The grammar: a sentence is SUBJECT VERB OBJECT ADVERBIAL, sometimes after a connector.
# fmt: off
SUBJECTS = (
    "the old mill", "the river", "our neighbour", "the night train", "a small committee", "the harbour master",
    "the village school", "the north bridge", "a travelling engineer", "the town council", "the baker's daughter",
    "the lighthouse keeper", "a flock of geese", "the county surveyor", "the library", "the market square",
)
VERBS = (
    "repaired", "painted", "measured", "inspected", "rebuilt", "described", "moved", "cleaned", "watched",
    "counted", "opened", "closed", "visited", "recorded", "replaced", "carried",
)
OBJECTS = (
    "the broken gate", "three wooden barrels", "the eastern wall", "a map of the valley", "the water pumps",
    "every window on the street", "the copper roof", "a crate of apples", "the signal lamps", "the stone steps",
    "the ledger of the last winter", "two iron wheels", "the chapel bells", "a box of letters", "the garden fence",
)
ADVERBIALS = (
    "before the first frost", "in the early morning", "after the long storm", "with great care", "for the third time",
    "without asking anyone", "during the spring fair", "while the tide was low", "at the end of the week",
    "by the light of a lantern", "as the rain began", "in less than an hour",
)
CONNECTORS = ("Later,", "Meanwhile,", "Then", "Afterwards,", "In the autumn,", "Nobody knew why, but")
# fmt: on
# The edit the prompt asks for: a word the grammar uses often, so the answer departs from the text in a few places.
EDITS = (("river", "canal"), ("town", "city"), ("bridge", "tunnel"), ("library", "museum"))


def sentence(rng: random.Random) -> str:
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ADVERBIALS)}."
    if rng.random() < 0.3:
        return f"{rng.choice(CONNECTORS)} {words}"
    return words[0].upper() + words[1:]


def text(rng: random.Random, tokenizer: Tokenizer, tokens: int) -> str:
    """Paragraphs of whole sentences, as many as fit in `tokens` tokens of the model's tokenizer."""
    paragraphs: list[list[str]] = [[]]
    while True:
        if len(paragraphs[-1]) >= rng.randint(4, 7):
            paragraphs.append([])
        paragraphs[-1].append(sentence(rng))
        candidate = "\n\n".join(" ".join(p) for p in paragraphs)
        if len(tokenizer.encode(candidate).ids) > tokens:
            paragraphs[-1].pop()
            return "\n\n".join(" ".join(p) for p in paragraphs if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="length of each text in the model's tokens")
    parser.add_argument("--tokenizer", type=Path, default=Path("/tmp/peers/smollm2-hf/tokenizer.json"))
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    rng = random.Random(args.seed)
    with args.out.open("w") as out:
        for _ in range(args.prompts):
            old, new = rng.choice(EDITS)
            prompt = (
                f"Copy the text below exactly as it is, word for word, but write '{new}' instead of '{old}'. "
                f"Reply with the text only.\n\n{text(rng, tokenizer, args.tokens)}"
            )
            out.write(json.dumps({"prompt": prompt}) + "\n")


if __name__ == "__main__":
    main()
