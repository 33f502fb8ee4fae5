"""W1 on a GPU: our engine against `transformers`' own `generate` and against the device's memory-bandwidth roofline.

`python -m sagellm.benchmarks.gpu_w1 --out w1.json` (scripts/gpu_check.sh runs it on an offline GPU machine). The
model is SmolLM2-135M's shape (30 layers, 576 wide, 9 query and 3 KV heads, 49,152 tokens, tied embeddings) with
random weights made here: the real weights do not travel to a machine without a network, and the speed of a dense
fp32 forward does not depend on the weights' values. W1-c16 (64 random 256-token prompts, 128 tokens out, 16 at a
time) and W1-c1 (a few prompts one at a time) go through `benchmarks/offline.py`: our `LLM.generate` with
max_num_seqs 16, and transformers on static batches of 16, both fp32 on the same GPU, EOS ignored.

The roofline: decode reads every weight once per step and each sequence's KV cache, so a step of B sequences at
context C moves W + B * KV(C) bytes, and at the device's copy bandwidth (measured here: a device-to-device copy,
bytes read plus written) its best rate is B * bandwidth / (W + B * KV(C)) tokens/s, C the mean context of W1's
decode. Each engine's decode rate (B / its median TPOT) is printed as a fraction of that bound."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sagellm.benchmarks.offline import OfflineConfig, run_offline
from sagellm.benchmarks.workloads import Workload

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)  # fmt: skip
FP32 = 4  # bytes per value: weights, activations and KV cache all fp32 in both engines


@dataclass(frozen=True)
class Roofline:
    bandwidth_gb_s: float  # measured copy bandwidth, bytes read + written per second / 1e9
    weight_bytes: int  # read once per decode step
    kv_bytes_per_token: int  # per sequence, per token of context, all layers (K and V)
    context: int  # mean context of a decode step in the workload

    def tokens_per_s(self, batch: int) -> float:
        step_bytes = self.weight_bytes + batch * self.kv_bytes_per_token * self.context
        return batch * self.bandwidth_gb_s * 1e9 / step_bytes


def make_random_model(directory: Path, layers: int) -> Path:
    """A Llama of SmolLM2-135M's shape (`layers` deep) with transformers' random initialization, and a word-level
    tokenizer of the same 49,152 tokens (ids 0-2 special), saved as a Hugging Face directory both engines load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    vocab |= {f"w{i}": i for i in range(len(vocab), SMOLLM2_SHAPE["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(SMOLLM2_SHAPE | {"num_hidden_layers": layers}))).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def copy_bandwidth_gb_s(device: torch.device, megabytes: int) -> float:
    """A device-to-device copy of `megabytes`, best of 5 after a warm-up: (bytes read + bytes written) / s / 1e9."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_roofline(model_dir: Path, bandwidth: float, context: int) -> Roofline:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # q, k, v, o, gate, up, down, two norms
    weights = (layers * per_layer + v * h + h) * FP32  # the tied embedding read once, as the LM head; the final norm
    return Roofline(bandwidth, weights, layers * 2 * kv * FP32, context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sagellm.benchmarks.gpu_w1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda", help="our engine's backend (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=SMOLLM2_SHAPE["num_hidden_layers"], help="model depth")
    parser.add_argument("--prompts", type=int, default=64, help="W1-c16 prompts (default: %(default)s)")
    parser.add_argument("--c1-prompts", type=int, default=4, help="W1-c1 prompts, one at a time (0: none)")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="our engine's step budget")
    parser.add_argument("--copy-mb", type=int, default=2048, help="size of the bandwidth copy (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from sagellm.backends.registry import get_backend

    device = get_backend(args.backend).device
    workloads = [Workload("w1-c16", args.prompts, args.input_len, args.output_len, max_concurrency=16)]
    if args.c1_prompts:
        workloads.append(Workload("w1-c1", args.c1_prompts, args.input_len, args.output_len, 1, one_at_a_time=True))
    with tempfile.TemporaryDirectory(prefix="gpu-w1-") as tmp:
        started = time.perf_counter()
        model_dir = make_random_model(Path(tmp) / "smollm2-shaped", args.layers)
        print(f"random SmolLM2-135M-shaped model ({args.layers} layers) made in {time.perf_counter() - started:.1f} s")
        bandwidth = copy_bandwidth_gb_s(device, args.copy_mb)
        print(f"{device}: copy bandwidth {bandwidth:.0f} GB/s (read + written, {args.copy_mb} MB device-to-device)")
        roofline = model_roofline(model_dir, bandwidth, args.input_len + args.output_len // 2)
        config = OfflineConfig(model=model_dir, workloads=workloads, backend=args.backend, progress=False,
                               max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
        report = run_offline(config)
    rows = []
    for row in report.rows:
        batch = next(w for w in workloads if w.name == row.workload).batch_size
        decode = batch * 1000 / row.median["tpot_p50_ms"]
        bound = roofline.tokens_per_s(batch)
        rows.append({"workload": row.workload, "engine": row.engine, **{k: row.median[k] for k in _METRICS},
                     "decode_tok_s": decode, "roofline_tok_s": bound, "roofline_fraction": decode / bound})  # fmt: skip
    _print_table(rows, roofline, report.machine)
    print(f"greedy outputs the same as transformers' (share of requests, per workload): {report.agreement()}")
    if args.out:
        results = report.to_json()
        results["definitions"] |= {
            "decode_tok_s": "the workload's batch size / median TPOT (a TPOT spans other requests' prefills too)",
            "roofline_tok_s": "batch * copy bandwidth / (weight bytes + batch * KV bytes at the mean decode context)",
        }
        results |= {
            "note": "random weights of SmolLM2-135M's shape: speed does not depend on the weights' values",
            "device": str(device),
            "roofline": vars(roofline) | {f"tok_s_at_{b}": roofline.tokens_per_s(b) for b in (1, 16)},
            "table": rows,
        }
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


_METRICS = ("out_tok_s", "ttft_p50_ms", "tpot_p50_ms")


def _print_table(rows: list[dict], roofline: Roofline, machine: dict) -> None:
    print(f"\nW1 on {machine.get('gpu') or machine.get('cpu')}, fp32, random weights of SmolLM2-135M's shape "
          "(speed does not depend on the weights' values)")  # fmt: skip
    print(f"decode step moves {roofline.weight_bytes / 1e6:.0f} MB of weights + {roofline.kv_bytes_per_token} B of KV "
          f"per token of context per sequence (mean context {roofline.context}); roofline at "
          f"{roofline.bandwidth_gb_s:.0f} GB/s: {roofline.tokens_per_s(1):.0f} tok/s at batch 1, "
          f"{roofline.tokens_per_s(16):.0f} at 16")  # fmt: skip
    print("| workload | engine | out tok/s | TTFT p50 ms | TPOT p50 ms | decode tok/s | roofline tok/s | of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['engine']} | {r['out_tok_s']:.1f} | {r['ttft_p50_ms']:.1f} | "
              f"{r['tpot_p50_ms']:.2f} | {r['decode_tok_s']:.0f} | {r['roofline_tok_s']:.0f} | "
              f"{100 * r['roofline_fraction']:.1f}% |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
