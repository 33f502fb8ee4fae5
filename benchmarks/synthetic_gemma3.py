"""`sagellm bench make-gemma3 --out DIR`: a small Gemma 3 that sees images (Gemma3ForConditionalGeneration), random
weights, saved as its Hugging Face checkpoint is, for image serving speed against llama.cpp on the same weights.

Gemma 3 4B's tower (27 layers of 1,152 at 896 pixels) and text model take minutes a request on a 2-core CPU, so the
shapes are shrunk where the work per image stays real: a SigLIP tower of 6 layers of 384 on 448-pixel images in
14-pixel patches (1,024 patches, 2 x 2 squares pooled into Gemma's 256 soft tokens), and SmolLM2-135M's sizes as a
Gemma 3 text model (12 layers of 576, 9 heads of 64 and 3 KV heads, 5 of 6 layers sliding over 512 tokens). The
tokenizer is SmolLM2's with Gemma 3's image tokens added, its chat template taking image parts as
<start_of_image>. The tower is saved under `vision_tower.vision_model.` as the hub's Gemma 3 checkpoints are (what
llama.cpp's converter reads); transformers' init spreads the weights as a trained model's are."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# SmolLM2's ChatML with list content: an image part is Gemma 3's placeholder, which its processor expands
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
IMAGE_SIZE, PATCH, SOFT_TOKENS = 448, 14, 256


def write_gemma3(out: Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )

    from sagellm.runtime.models.model_cache import resolve_model

    tokenizer = PreTrainedTokenizerFast.from_pretrained(resolve_model("smollm2-135m-instruct"))
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    tokenizer._set_model_specific_special_tokens(IMAGE_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS.values()))
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=12,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, query_pre_attn_scalar=64, sliding_window=512,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                                image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)  # fmt: skip
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=SOFT_TOKENS,
                          boi_token_index=ids[0], image_token_index=ids[1], eoi_token_index=ids[2])  # fmt: skip
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(config).eval().save_pretrained(out)
    weights = load_file(out / "model.safetensors")  # the tower under the hub's names, which llama.cpp reads
    hub = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
           for k, v in weights.items()}  # fmt: skip
    save_file(hub, out / "model.safetensors", metadata={"format": "pt"})
    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=SOFT_TOKENS,
                                chat_template=CHAT_TEMPLATE)  # fmt: skip
    processor.save_pretrained(out)
    images.save_pretrained(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint's directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    write_gemma3(args.out, seed=args.seed)
    print(f"{args.out}: a Gemma 3 with its vision tower, written in {time.monotonic() - start:.0f} s")
    return 0
