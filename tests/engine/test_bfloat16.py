"""The opt-in bfloat16 linears (EngineConfig.dtype): bf16 weights and inputs with fp32 sums where the CPU multiplies
bf16 natively, the same logits as fp32 within bf16's rounding, refused with the reason elsewhere; float32 stays the
default and exact."""

from __future__ import annotations

import pytest
import torch

from sagellm.backends import get_backend
from sagellm.backends.cpu_linear import linear, pack_linear_weight
from sagellm.backends.native import isa
from sagellm.common.errors import FieldError
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama

BF16_CPU = bool({"avx512_bf16", "amx_bf16"} & isa.cpu_flags())


def test_a_bf16_weight_takes_fp32_inputs_and_gives_fp32_with_the_bias_added_in_fp32() -> None:
    weight, x, bias = torch.randn(96, 64), torch.randn(300, 64), torch.randn(96)
    packed = pack_linear_weight(weight.to(torch.bfloat16))
    out = linear(x, packed, bias)
    assert out.dtype == torch.float32 and out.shape == (300, 96)
    expected = x.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().T + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_dtype_takes_vllms_names_and_refuses_others() -> None:
    assert EngineConfig().dtype == "auto"
    with pytest.raises(FieldError, match="dtype must be one of auto, float32, bfloat16"):
        EngineConfig(dtype="float16")


def test_a_cpu_without_native_bf16_refuses_it_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert "AVX512-BF16 or AMX" in get_backend("cpu").linear_dtype_problem(torch.bfloat16)
    assert get_backend("cpu").linear_dtype_problem(torch.float32) is None


@pytest.mark.skipif(not BF16_CPU, reason="needs a CPU with AVX512-BF16 or AMX")
def test_bf16_prefill_logits_are_fp32_s_within_bf16_rounding(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "llama")
    logits: dict[str, torch.Tensor] = {}
    for dtype in ("float32", "bfloat16"):
        engine = LLMEngine(EngineConfig(model=str(path), dtype=dtype, kv_cache_memory_gb=0.01))
        execute = engine.runner.execute
        engine.runner.execute = lambda batch, e=execute, d=dtype: logits.setdefault(d, e(batch))
        engine.add_request("a", list(range(3, 120)), SamplingParams(max_tokens=1, temperature=0))  # 117 rows: oneDNN
        while engine.has_unfinished_requests():
            engine.step()
        engine.close()
    fp32, bf16 = logits["float32"], logits["bfloat16"]
    assert not torch.equal(fp32, bf16), "bf16 linears ran"
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05 * fp32.abs().max().item())
