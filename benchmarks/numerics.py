"""`sagellm bench numerics`: what the opt-in fast numerics cost in accuracy against exact float32, and what they gain in
speed, in one run: the bfloat16 linears (`--dtype bfloat16`, where the CPU multiplies bf16) and the int8 activations of
the Q4_0/Q4_1 and K-quant linears (`--int8-activations`, llama.cpp's rounding).

Accuracy: the same prompts through the float32 engine and one engine per mode on one model, greedy: the share of
replies that are identical, how many tokens the others agree on before they first differ, and the logits of the last
position of the prompts whose prefill ends in the first step (the same ones in every engine): the largest and mean
absolute difference, relative to the fp32 logits' spread. Speed: the offline W1-c16 shape (random 256-token prompts,
128 tokens each, 16 at once) through each engine.

`--peer NAME=URL=MODEL` adds a running OpenAI-compatible server (vLLM with `--dtype bfloat16`, llama.cpp on the
Q4_1 file, ...) to the accuracy table: the same chat prompts, rendered to token ids by our tokenizer so every server
reads the same ids, greedy through its /v1/completions; its reply text against our float32 text (tokens counted with
our tokenizer)."""

from __future__ import annotations

import argparse

import torch

# Each opt-in mode: the EngineConfig fields that turn it on.
MODES = {"bfloat16": {"dtype": "bfloat16"}, "int8-activations": {"int8_activations": True}}

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
        "--mode",
        action="append",
        choices=sorted(MODES),
        help="a fast mode to measure (repeatable; default: each one this machine runs)",
    )
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
    modes = {"float32": {}} | {m: MODES[m] for m in args.mode or _runnable_modes(args.model)}
    for mode, fields in modes.items():
        llm = LLM(args.model, **fields) if args.model else LLM(**fields)
        execute = llm.engine.runner.execute
        llm.engine.runner.execute = lambda batch, run=execute, m=mode: _first(logits, m, run(batch))
        chats = [llm.apply_chat_template([{"role": "user", "content": prompt}]) for prompt in PROMPTS]
        outs = [out.outputs[0] for out in llm.generate(chats, greedy)]
        replies[mode], texts[mode] = [list(out.token_ids) for out in outs], [out.text for out in outs]
        llm.engine.runner.execute = execute
        if args.prompts:
            tokens, seconds = offline_w1_c16(llm, args.prompts)
            speed[mode] = tokens / seconds
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
        label = f"sageLLM {name}" if name in modes else name
        print(f"| {label} | {same}/{len(PROMPTS)} | {first}/{len(PROMPTS)} | {agreed} |")
    fp32 = logits["float32"]
    for mode in [m for m in modes if m != "float32"]:
        error = (logits[mode] - fp32).abs() / fp32.std(dim=-1, keepdim=True)
        print(f"\nsageLLM {mode}, logits of the {fp32.shape[0]} prompts prefilled in the first step: error max / "
              f"mean {error.max():.3f} / {error.mean():.4f} (in units of the fp32 logits' std)")  # fmt: skip
    if speed:
        each = ", ".join(f"{m} {v:.1f}" + ("" if m == "float32" else f" ({v / speed['float32']:.2f}x)")
                         for m, v in speed.items())  # fmt: skip
        print(f"\nW1-c16 offline ({args.prompts} prompts), out tok/s: {each}")
    return 0


def _runnable_modes(model: str | None) -> list[str]:
    """The modes this machine runs on `model`'s default weights: bfloat16 where the CPU multiplies it, int8
    activations where the native kernels are built (the default model's weights are Q4_1)."""
    from sagellm.backends.registry import get_backend

    backend = get_backend("cpu")
    modes = [] if backend.linear_dtype_problem(torch.bfloat16) else ["bfloat16"]
    return modes + ([] if backend.int8_activations_problem({"Q4_1"}) else ["int8-activations"])


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
