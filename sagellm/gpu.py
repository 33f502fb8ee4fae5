"""The NVIDIA GPU inventory, read through NVML (`pynvml`, from the `nvidia-ml-py` distribution).

The control plane asks it how many GPUs an engine can have (`tensor_parallel`, `use_gpu`), and `sagellm gpu` and
`GET /v1/management/gpu` show it. A machine without an NVIDIA driver or GPU is a normal answer, not an error: an
empty list and the reason ("no NVIDIA GPU found (NVML: ...)"), so every caller can say why in one line. A value one
GPU does not report (temperature on some boards, utilization under MIG) is None rather than a failure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    utilization_percent: int | None  # GPU busy time over the last sample period
    temperature_c: int | None


@dataclass(frozen=True)
class GpuInventory:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    reason: str | None = None  # why `gpus` is empty

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gpu_inventory() -> GpuInventory:
    """Every NVIDIA GPU NVML sees (blocking; call it from a worker thread in async code)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return GpuInventory(reason=f"no NVIDIA GPU found (NVML: {error})")
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return GpuInventory(reason="no NVIDIA GPU found (NVML: the driver reports 0 devices)")
        gpus = [_device(pynvml, i) for i in range(count)]
        return GpuInventory(gpus, driver_version=_text(pynvml.nvmlSystemGetDriverVersion()))
    except pynvml.NVMLError as error:
        return GpuInventory(reason=f"NVML failed: {error}")
    finally:
        pynvml.nvmlShutdown()


def _device(pynvml: Any, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(pynvml, lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    temperature = _optional(pynvml, lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    return GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total_mib=memory.total // MIB,
        memory_used_mib=memory.used // MIB,
        memory_free_mib=memory.free // MIB,
        utilization_percent=utilization,
        temperature_c=temperature,
    )


def _optional(pynvml: Any, read: Callable[[], T]) -> T | None:
    try:
        return read()
    except pynvml.NVMLError:  # NOT_SUPPORTED on this board or mode
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def render_gpu_table(inventory: GpuInventory) -> Any:
    """A rich Table of the GPUs, or a Text with the reason there are none."""
    from rich.table import Table
    from rich.text import Text

    if not inventory.gpus:
        return Text(inventory.reason or "no NVIDIA GPU found", style="yellow")
    table = Table("gpu", "name", "memory used / total", "free", "util", "temp", title="NVIDIA GPUs")
    for gpu in inventory.gpus:
        table.add_row(
            str(gpu.index),
            gpu.name,
            f"{gpu.memory_used_mib} / {gpu.memory_total_mib} MiB",
            f"{gpu.memory_free_mib} MiB",
            "-" if gpu.utilization_percent is None else f"{gpu.utilization_percent}%",
            "-" if gpu.temperature_c is None else f"{gpu.temperature_c} °C",
        )
    table.caption = f"driver {inventory.driver_version}"
    return table
