"""Where an engine's process runs: its share of the engine's `device_ids`, and how many torch threads it uses.

One rule for every rank of a tensor parallel group and for a lone engine: on an accelerator each rank takes one
device index (the group needs as many as it has ranks); on the CPU the listed cores are shared out, contiguous and
as even as can be, and each rank's threads are pinned to its share, one torch thread per core. Without device ids a
lone engine keeps torch's threads (all cores) and the ranks of a group split the cores between them."""

from __future__ import annotations

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.common.affinity import pin_process, usable_cores
from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.tensor_parallel import partition


def place(
    backend: HardwareBackend, device_ids: list[int] | None, num_threads: int | None, rank: int = 0, world_size: int = 1
) -> None:
    """Puts this process, rank `rank` of `world_size`, on its devices and sets its torch threads."""
    threads = num_threads
    if device_ids and backend.device.type == "cpu":
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
    elif world_size > 1:
        threads = threads or max(1, len(usable_cores()) // world_size)  # the cores shared among the ranks
    if threads:
        torch.set_num_threads(threads)
