"""What the coding-agent tests share: a model with the context their prompts need, served as `MODEL`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sagellm.runtime.models.loader import load_model

MODEL = "tiny-agent"


def npm_tool(tmp_path_factory: pytest.TempPathFactory, package: str, binary: str) -> Path:
    """`package` (name@version) installed from the npm registry into a directory of the test session's own; the path
    of its `binary`."""
    if shutil.which("npm") is None:
        pytest.fail(f"npm is needed to install {package} from the npm registry (apt install nodejs npm)")
    prefix = tmp_path_factory.mktemp(binary)
    subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", package],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return prefix / "node_modules" / ".bin" / binary


@pytest.fixture(scope="package")
def long_context_model(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2 with SmolLM2's tokenizer and template, its context 32,768 tokens, that ends its replies:
    a large value bias in its last layer puts one fixed direction into every hidden state, and the end-of-turn
    token's output row points along it, so each sampled token is the end with probability about one half."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_model(smollm2_dir, load_weights=False).tokenizer
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[-1].self_attn.v_proj.bias.copy_(100 * torch.randn(config.num_key_value_heads * 16))
        prompts = torch.randint(0, config.vocab_size, (2, 12))
        hidden = model.model(prompts).last_hidden_state[:, -1]  # after the final norm
        assert torch.cosine_similarity(hidden[0], hidden[1], dim=0) > 0.99  # one direction, whatever the tokens
        direction = hidden.mean(0)
        # logit(end) = 11 ~ log(vocab): as likely as all other tokens together, whose logits stay near 0
        model.lm_head.weight[tokenizer.eos_token_id] = 11 * direction / direction.dot(direction)
    directory = tmp_path_factory.mktemp("agent-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
