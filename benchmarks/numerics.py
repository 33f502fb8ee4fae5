"""`sagellm bench numerics`: what the opt-in bfloat16 linears (`--dtype bfloat16`) cost in accuracy against float32, and
what they gain in speed, in one run.

Accuracy: the same prompts through an fp32 and a bf16 engine on one model, greedy: the share of replies that are
identical, how many tokens the others agree on before they first differ, and the logits of the last position of the
prompts whose prefill ends in the first step (the same ones in both engines): the largest and mean absolute
difference, relative to the fp32 logits' spread, and whether the top token is the same. Speed: the offline W1-c16
shape (random 256-token prompts, 128 tokens each, 16 at once) through both engines.

`--peer NAME=URL=MODEL` adds a running OpenAI-compatible server (vLLM with `--dtype bfloat16`, llama.cpp on the
Q4_1 file, ...) to the accuracy table: the same chat prompts, rendered to token ids by our tokenizer so every server
reads the same ids, greedy through its /v1/completions; its reply text against our float32 text (tokens counted with
our tokenizer)."""

from __future__ import annotations

import argparse

import torch

# Short instructions of the kinds people send a small chat model: facts, lists, code, arithmetic, rewriting.
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "Give me a Python function that reverses a string.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What does HTTP stand for?",
    "Write a short email asking a colleague for a meeting tomorrow.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a name for a bakery.",
    "Rewrite this sentence more formally: gonna be late, sorry.",
    "What is photosynthesis?",
    "Give two tips for sleeping better.",
    "Who wrote 'Pride and Prejudice'?",
    "Convert 5 kilometers to miles.",
    "What is the difference between a list and a tuple in Python?",
    "Write a limerick about a cat.",
    "What are the three states of matter?",
    "Describe a rainbow to someone who has never seen one.",
    "What year did the first person walk on the moon?",
    "Give an example of a prime number greater than 50.",
    "What is the main ingredient of guacamole?",
    "Explain recursion to a child.",
    "Name a famous painting by Leonardo da Vinci.",
    "What is the square root of 144?",
    "Write one sentence that uses the word 'ephemeral'.",
    "What causes the seasons on Earth?",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="model (default: smollm2-135m-instruct)")
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt (default: 64)")
    parser.add_argument("--prompts", type=int, default=64, help="W1-c16 prompts of the speed run, 0: none")
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=URL=MODEL",
        help="a running server to compare too, e.g. vllm-bf16=http://127.0.0.1:8100=smollm2 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    from sagellm import LLM, SamplingParams
    from sagellm.benchmarks.vllm_results import cpu_description
    from sagellm.benchmarks.workloads import offline_w1_c16

    print(f"CPU: {cpu_description()}")
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    replies: dict[str, list[list[int]]] = {}
    texts: dict[str, list[str]] = {}
    logits: dict[str, torch.Tensor] = {}
    speed: dict[str, float] = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(args.model, dtype=dtype) if args.model else LLM(dtype=dtype)
        execute = llm.engine.runner.execute
        llm.engine.runner.execute = lambda batch, run=execute, d=dtype: _first(logits, d, run(batch))
        chats = [llm.apply_chat_template([{"role": "user", "content": prompt}]) for prompt in PROMPTS]
        outs = [out.outputs[0] for out in llm.generate(chats, greedy)]
        replies[dtype], texts[dtype] = [list(out.token_ids) for out in outs], [out.text for out in outs]
        llm.engine.runner.execute = execute
        if args.prompts:
            tokens, seconds = offline_w1_c16(llm, args.prompts)
            speed[dtype] = tokens / seconds
        tokenizer = llm.tokenizer
        llm.engine.close()
    for peer in args.peer:
        name, url, model = peer.split("=", 2)
        texts[name] = _peer_replies(url, model, chats, args.max_tokens)
        replies[name] = [tokenizer.encode(text, add_special_tokens=False) for text in texts[name]]
    print(f"\n{len(PROMPTS)} chat prompts, greedy, up to {args.max_tokens} tokens: each engine against our float32")
    print("| engine | replies identical | first token the same | the others: tokens the same before they differ |")
    print("|---|---|---|---|")
    reference = texts["float32"], replies["float32"]
    for name in [n for n in texts if n != "float32"]:
        same = sum(a == b for a, b in zip(reference[0], texts[name]))
        first = sum(a[:1] == b[:1] for a, b in zip(reference[1], replies[name]))
        pairs = zip(reference[1], replies[name], reference[0], texts[name])
        agreed = sorted(_common_prefix(ids, other) for ids, other, text, peer in pairs if text != peer)
        label = "sageLLM bfloat16" if name == "bfloat16" else name
        print(f"| {label} | {same}/{len(PROMPTS)} | {first}/{len(PROMPTS)} | {agreed} |")
    fp32, bf16 = logits["float32"], logits["bfloat16"]
    error = (bf16 - fp32).abs() / fp32.std(dim=-1, keepdim=True)
    print(f"\nsageLLM bfloat16, logits of the {fp32.shape[0]} prompts prefilled in the first step: error max / mean "
          f"{error.max():.3f} / {error.mean():.4f} (in units of the fp32 logits' std)")  # fmt: skip
    if speed:
        print(f"\nW1-c16 offline ({args.prompts} prompts): float32 {speed['float32']:.1f} out tok/s, "
              f"bfloat16 {speed['bfloat16']:.1f} ({speed['bfloat16'] / speed['float32']:.2f}x)")  # fmt: skip
    return 0


def _peer_replies(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy replies of the server at `url` to prompts given as token ids."""
    import httpx

    texts = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for ids in prompts:
            body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0}
            response = http.post("/v1/completions", json=body)
            response.raise_for_status()
            texts.append(response.json()["choices"][0]["text"])
    return texts


def _first(store: dict[str, torch.Tensor], dtype: str, logits: torch.Tensor) -> torch.Tensor:
    """Keeps the logits of the first step: the last position of each prompt whose prefill it ends."""
    store.setdefault(dtype, logits.float().clone())
    return logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
