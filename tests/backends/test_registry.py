"""The backend registry: lookup, "auto", errors for unknown and unavailable backends, the listing, and that listing
never imports a vendor stack."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sagellm.backends import registry
from sagellm.backends.base import Availability, BackendUnavailableError, HardwareBackend
from sagellm.backends.cpu import CpuBackend
from sagellm.backends.kernel_contracts import REQUIRED_OPS, KernelTable

BUILTINS = ["cpu", "cuda", "ascend", "cambricon", "hygon"]


def test_lists_all_builtins_with_cpu_available() -> None:
    listed = dict(registry.list_backends())
    assert list(listed) == BUILTINS
    assert all(isinstance(status, Availability) for status in listed.values())
    assert listed["cpu"].available and "threads" in listed["cpu"].reason
    for name, status in listed.items():
        assert status.reason, name


def test_get_cpu_and_auto() -> None:
    cpu = registry.get_backend("cpu")
    assert isinstance(cpu, CpuBackend) and cpu.device == torch.device("cpu")
    assert set(REQUIRED_OPS) <= set(cpu.kernels())
    expected = "cuda" if registry.availability_of(registry.BACKENDS.get("cuda")).available else "cpu"
    assert registry.get_backend("auto").name == expected


def test_unknown_name_lists_known_backends() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tpu'") as err:
        registry.get_backend("tpu")
    for name in ["auto", *BUILTINS]:
        assert name in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_unavailable_says_why() -> None:
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' is not available: needs .*no CUDA device"):
        registry.get_backend("cuda")


@pytest.mark.parametrize(
    ("name", "needs"),
    [("ascend", "needs torch_npu (Huawei Ascend CANN)"), ("cambricon", "needs torch_mlu (Cambricon Neuware)")],
)
def test_plugin_backends_unavailable_say_what_they_need(name: str, needs: str) -> None:
    status = dict(registry.list_backends())[name]
    if status.available:
        pytest.skip(f"{name} is available here")
    assert status.reason.startswith(needs)
    with pytest.raises(BackendUnavailableError, match=f"backend '{name}' is not available: needs"):
        registry.get_backend(name)


@pytest.mark.skipif(torch.version.hip is not None, reason="this is a ROCm build")
def test_hygon_unavailable_without_rocm() -> None:
    with pytest.raises(BackendUnavailableError, match="needs a ROCm build of torch"):
        registry.get_backend("hygon")


def test_a_name_taken_by_another_class_raises_and_a_new_name_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.backend_names()  # the built-ins first, so the copy below holds them
    monkeypatch.setattr(registry.BACKENDS, "_classes", dict(registry.BACKENDS.items()))

    class Broken(HardwareBackend):
        name = "broken"

        @classmethod
        def availability(cls) -> Availability:
            raise OSError("driver exploded")

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        def kernels(self) -> KernelTable:
            raise AssertionError("never built: its availability check raises")

    registry.register_backend(Broken)
    registry.register_backend(Broken)  # the same class again, as a re-imported module registers it: no change
    with pytest.raises(ValueError, match="backend 'cpu' is registered twice"):
        registry.register_backend(type("OtherCpu", (CpuBackend,), {}))
    status = dict(registry.list_backends())["broken"]
    assert not status.available and "detection failed: OSError: driver exploded" in status.reason
    with pytest.raises(BackendUnavailableError, match="driver exploded"):
        registry.get_backend("broken")


@pytest.mark.slow
def test_listing_imports_no_vendor_stack() -> None:
    code = (
        "import sys\n"
        "from sagellm.backends.registry import list_backends\n"
        "list_backends()\n"
        "print(sorted(m for m in ('triton', 'torch_npu', 'torch_mlu') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
