"""Where an engine's process runs: its share of the engine's `device_ids`, and how many torch threads it uses.

One rule for every rank of a tensor parallel group and for a lone engine: on an accelerator each rank takes one
device index (the group needs as many as it has ranks); on the CPU the listed cores are shared out, contiguous and
as even as can be, and each rank's threads are pinned to its share, one torch thread per core. Without device ids a
lone engine takes OMP_NUM_THREADS threads where it is set, else the cores the process may use (its affinity's
physical cores, fewer under a cgroup quota), and the ranks of a group split them. On the CPU that count is a
ceiling: with `adaptive`, a governor runs fewer threads while other programs use the cores
(runtime/engine/thread_governor.py)."""

from __future__ import annotations

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.common.affinity import default_thread_count, pin_process, usable_cores
from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.thread_governor import govern_threads, stop_governing
from sagellm.runtime.models.tensor_parallel import partition


def place(
    backend: HardwareBackend,
    device_ids: list[int] | None,
    num_threads: int | None,
    rank: int = 0,
    world_size: int = 1,
    adaptive: bool = True,
) -> None:
    """Puts this process, rank `rank` of `world_size`, on its devices and sets its torch threads (on the CPU, the
    most it runs while others leave it the cores, with `adaptive`)."""
    threads = num_threads
    cores = usable_cores()
    on_cpu = backend.device.type == "cpu"
    if device_ids and on_cpu:
        if len(device_ids) < world_size:
            raise InvalidInput(f"device_ids {device_ids}: {world_size} ranks need at least {world_size} cores")
        start, stop = partition(len(device_ids), world_size, rank)
        cores = device_ids[start:stop]
        pin_process(cores)
        threads = threads or len(cores)
    elif device_ids:
        if len(device_ids) != world_size:
            raise InvalidInput(f"device_ids {device_ids}: {world_size} rank(s) need exactly {world_size} device(s)")
        backend.select_device(device_ids[rank])
    else:
        threads = threads or max(1, default_thread_count() // world_size)  # the cores shared among the ranks
    if threads:
        torch.set_num_threads(threads)
    if on_cpu and adaptive and threads:
        govern_threads(threads, cores)
    else:
        stop_governing()
