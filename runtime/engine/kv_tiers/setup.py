"""Builds an engine's tiers under the prefix cache from its settings (`kv_offload_ram_gb`, `kv_offload_dir`,
`kv_offload_disk_gb`): the payload layout, the identity its disk files are shared under, RAM and disk, joined to the
scheduler's block bookkeeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import torch

from sagellm.backends.base import HardwareBackend
from sagellm.backends.native import isa
from sagellm.common.errors import FieldError
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.kv_tiers.block_payloads import FULL, SLIDING, STATES, BlockPayloads
from sagellm.runtime.engine.kv_tiers.disk_tier import DiskTier, ForeignLayout
from sagellm.runtime.engine.kv_tiers.identity import default_disk_budget, identity_digest, tier_identity
from sagellm.runtime.engine.kv_tiers.peer_blocks import BlockClient
from sagellm.runtime.engine.kv_tiers.prefix_tiers import PrefixTiers
from sagellm.runtime.engine.kv_tiers.ram_tier import RamTier
from sagellm.runtime.engine.kv_tiers.tier_store import TierStore
from sagellm.runtime.engine.model_runner import ModelRunner
from sagellm.runtime.engine.scheduler import Scheduler
from sagellm.runtime.models.loaded import LoadedModel

log = structlog.get_logger("sagellm.kv_tiers")
GIB = 1 << 30


def prefix_tiers(
    config: EngineConfig,
    model: LoadedModel,
    backend: HardwareBackend,
    scheduler: Scheduler,
    runner: ModelRunner,
    head_runner: ModelRunner | None,
) -> PrefixTiers:
    """The tiers `config` asks for, joined to `scheduler`'s blocks and `runner`'s (and an MTP head's) caches."""
    if config.world_size > 1:
        raise FieldError("kv_offload_ram_gb", "the KV offload tiers serve an engine of one rank (no tensor or "
                         "pipeline parallelism) for now")  # fmt: skip
    payloads = BlockPayloads(runner, head_runner)
    layouts = {group: payloads.nbytes(group) for group in (FULL, SLIDING, STATES)}
    identity = tier_identity(model.source, model.config.architecture, layouts, config.block_size, config.dtype,
                             backend.name, _kernels(backend))  # fmt: skip
    ram = RamTier(int(config.kv_offload_ram_gb * GIB)) if config.kv_offload_ram_gb > 0 else None
    disk = _disk_tier(config, identity) if config.kv_offload_dir is not None else None
    if ram is None and disk is None:  # a foreign directory, refused
        raise FieldError("kv_offload_dir", f"kv_offload_dir {config.kv_offload_dir}: holds another model's blocks "
                         "under this one's name; name another directory")  # fmt: skip
    tiers = PrefixTiers(scheduler.block_manager, scheduler.state_slots, TierStore(ram, disk), payloads)
    tiers.identity_sha = identity_digest(identity)
    tiers.peers = BlockClient(tiers.identity_sha)
    return tiers


def _disk_tier(config: EngineConfig, identity: dict[str, Any]) -> DiskTier | None:
    """The disk tier, or None (logged) where the directory's namespace for this identity holds another's blocks: an
    engine never reads those, and runs with the RAM tier alone."""
    directory = Path(config.kv_offload_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FieldError("kv_offload_dir", f"kv_offload_dir {directory}: {error.strerror}") from None
    budget = int(config.kv_offload_disk_gb * GIB) if config.kv_offload_disk_gb else default_disk_budget(directory)
    try:
        disk = DiskTier(directory, identity, budget)
    except ForeignLayout as error:
        log.error("kv_disk_tier_refused", directory=str(directory), why=str(error))
        return None
    log.info("kv_disk_tier", directory=str(directory), namespace=disk.namespace, budget_gib=round(budget / GIB, 2))
    return disk


def _kernels(backend: HardwareBackend) -> str:
    """What computes the KV: the CPU's kernel variant (they round differently), or the device's name."""
    if backend.device.type == "cpu":
        return isa.chosen().name
    return torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else backend.device.type
