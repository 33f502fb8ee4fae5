"""The disk tier on real files: blocks round-trip (written now, by the writer thread, or by an earlier run), every kind
of bad file is refused, set aside and counted, a foreign namespace is never served, the janitor keeps the directory
within budget by recency and clears crash litter, two processes share one directory, and a stalled writer never
blocks the engine that submits."""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from sagellm.runtime.engine.kv_tiers.block_file import BlockKey, BlockMeta
from sagellm.runtime.engine.kv_tiers.disk_tier import DiskTier, ForeignLayout
from sagellm.runtime.engine.prefix_hash import ROOT_HASH, hash_block

IDENTITY = {"model": "tiny-llama@abc123", "dtype": "bfloat16", "block_size": 4, "layout": [2, 4, 8]}
PAYLOAD = 16 * 1024
HEADER = 128  # a 4-token block's header, padded to 64 bytes
FILE = HEADER + PAYLOAD
GENEROUS = 1 << 30
SPAWN = multiprocessing.get_context("spawn")


def make_block(i: int, group: str = "f", extra: bytes = b"") -> tuple[BlockKey, BlockMeta, torch.Tensor]:
    """Block i: 4 tokens of its own under the root, and 16 KiB of bytes that only it has."""
    meta = BlockMeta(ROOT_HASH, tuple(range(4 * i, 4 * i + 4)), extra)
    payload = torch.randint(0, 256, (PAYLOAD,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
    return BlockKey(group, hash_block(meta.parent, meta.tokens, meta.extra)), meta, payload


def reads_back(tier: DiskTier, key: BlockKey, meta: BlockMeta, payload: torch.Tensor) -> bool:
    out = torch.empty_like(payload)
    return tier.read_into(key, meta, out) and torch.equal(out, payload)


def path_of(tier: DiskTier, key: BlockKey) -> Path:
    return Path(tier._path(key))


@pytest.fixture
def tier(tmp_path: Path):
    tier = DiskTier(tmp_path, IDENTITY, GENEROUS)
    yield tier
    tier.close()


def test_blocks_round_trip_written_now_by_the_writer_thread_and_after_a_restart(tmp_path: Path):
    tier = DiskTier(tmp_path, IDENTITY, GENEROUS)
    now, later, states = make_block(1), make_block(2, extra=b"image-key"), make_block(3, group="r")
    assert not tier.contains(now[0]) and not reads_back(tier, *now)
    assert tier.write(*now) and tier.contains(now[0]) and reads_back(tier, *now)
    tier.submit(*later)
    tier.submit(states[0], states[1], states[2].clone())  # the writer owns what it is handed
    assert tier.flush(timeout_s=10) == 0
    assert reads_back(tier, *later) and reads_back(tier, *states)
    assert tier.write(*now)  # the same block again: already there, still True
    assert tier.published() == {now[0], later[0], states[0]} and tier.written == 4  # bytes_used races the start scan
    tier.close()
    tier.close()

    restarted = DiskTier(tmp_path, IDENTITY, GENEROUS)
    assert restarted.namespace == tier.namespace
    assert all(reads_back(restarted, *block) for block in (now, later, states))
    assert restarted.flush(timeout_s=10) == 0 and restarted.bytes_used == 3 * FILE  # the first scan's estimate
    assert not restarted.bad_files and not tier.bad_files
    restarted.close()


def flip_payload_byte(tier: DiskTier, key: BlockKey, meta: BlockMeta) -> tuple[BlockKey, BlockMeta, int]:
    _flip(path_of(tier, key), FILE - 100)
    return key, meta, PAYLOAD


def flip_token_byte(tier: DiskTier, key: BlockKey, meta: BlockMeta) -> tuple[BlockKey, BlockMeta, int]:
    _flip(path_of(tier, key), 70)
    return key, meta, PAYLOAD


def flip_magic(tier: DiskTier, key: BlockKey, meta: BlockMeta) -> tuple[BlockKey, BlockMeta, int]:
    _flip(path_of(tier, key), 0)
    return key, meta, PAYLOAD


def copy_in_another_identitys_file(tier: DiskTier, key: BlockKey, meta: BlockMeta) -> tuple[BlockKey, BlockMeta, int]:
    other = DiskTier(tier.root.parent.parent / "other", {**IDENTITY, "dtype": "float16"}, GENEROUS)
    assert other.write(key, meta, torch.zeros(PAYLOAD, dtype=torch.uint8))
    other.close()
    shutil.copyfile(path_of(other, key), path_of(tier, key))
    return key, meta, PAYLOAD


def rename_to_another_hash(tier: DiskTier, key: BlockKey, meta: BlockMeta) -> tuple[BlockKey, BlockMeta, int]:
    other_key, other_meta, _ = make_block(99)
    path_of(tier, other_key).parent.mkdir(parents=True, exist_ok=True)
    os.rename(path_of(tier, key), path_of(tier, other_key))
    return other_key, other_meta, PAYLOAD


def ask_with_other_tokens(tier: DiskTier, key: BlockKey, meta: BlockMeta) -> tuple[BlockKey, BlockMeta, int]:
    return key, BlockMeta(meta.parent, (7, 7, 7, 7)), PAYLOAD


def ask_for_another_size(tier: DiskTier, key: BlockKey, meta: BlockMeta) -> tuple[BlockKey, BlockMeta, int]:
    return key, meta, PAYLOAD // 2


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (flip_payload_byte, "corrupt"),
        (flip_token_byte, "corrupt"),
        (flip_magic, "corrupt"),
        (copy_in_another_identitys_file, "foreign"),
        (rename_to_another_hash, "mismatch"),
        (ask_with_other_tokens, "mismatch"),
        (ask_for_another_size, "mismatch"),
    ],
)
def test_a_bad_file_is_refused_set_aside_and_counted(tier: DiskTier, damage, why: str):
    key, meta, payload = make_block(1)
    assert tier.write(key, meta, payload)
    read_key, read_meta, size = damage(tier, key, meta)
    assert not tier.read_into(read_key, read_meta, torch.empty(size, dtype=torch.uint8))
    _assert_set_aside(tier, read_key, why)
    assert tier.write(key, meta, payload) and reads_back(tier, key, meta, payload)  # a good copy is served again


@pytest.mark.parametrize("cut", [0, 6, 40, HEADER - 1, HEADER, HEADER + 1000, FILE - 1])
def test_a_truncated_file_is_refused_set_aside_and_counted(tier: DiskTier, cut: int):
    key, meta, payload = make_block(1)
    assert tier.write(key, meta, payload)
    os.truncate(path_of(tier, key), cut)
    assert not reads_back(tier, key, meta, payload)
    _assert_set_aside(tier, key, "truncated")
    assert tier.write(key, meta, payload) and reads_back(tier, key, meta, payload)


def _assert_set_aside(tier: DiskTier, key: BlockKey, why: str) -> None:
    path = path_of(tier, key)
    assert not path.exists() and not tier.contains(key)
    assert [p.name for p in path.parent.iterdir()] == [f"{path.name}.bad.{os.getpid()}"]
    assert tier.bad_files == collections.Counter({why: 1})
    published = tier.published()
    assert key not in published


def test_a_namespace_of_another_layout_is_never_served(tmp_path: Path):
    tier = DiskTier(tmp_path, IDENTITY, GENEROUS)
    key, meta, payload = make_block(1)
    assert tier.write(key, meta, payload)
    tier.close()
    layout = tier.root / "layout.json"
    assert json.loads(layout.read_text()) == {"format": 1, "identity": IDENTITY}
    for foreign in ('{"format": 1, "identity": {"model": "other"}}', '{"format": 2, "identity": ', ""):
        layout.write_text(foreign)
        with pytest.raises(ForeignLayout, match="another model or layout"):
            DiskTier(tmp_path, IDENTITY, GENEROUS)
    assert path_of(tier, key).exists()  # refused before anything was read or set aside
    neighbour = DiskTier(tmp_path, {**IDENTITY, "block_size": 8}, GENEROUS)  # another identity: its own namespace
    assert neighbour.namespace != tier.namespace and not neighbour.contains(key)
    neighbour.close()


def test_parts_are_never_read_and_the_janitor_clears_old_parts_and_bad_files(tmp_path: Path):
    scratch = DiskTier(tmp_path / "scratch", IDENTITY, GENEROUS)
    key, meta, payload = make_block(1)
    assert scratch.write(key, meta, payload)
    scratch.close()
    tier = DiskTier(tmp_path, IDENTITY, GENEROUS)
    old_part, fresh_part = tier.root / "tmp" / f"{key.block_hash:016x}.1.1.0.part", tier.root / "tmp" / "x.2.2.0.part"
    shutil.copyfile(path_of(scratch, key), old_part)  # a whole block a writer died before publishing
    shutil.copyfile(path_of(scratch, key), fresh_part)
    eleven_minutes_ago = time.time() - 660
    os.utime(old_part, (eleven_minutes_ago, eleven_minutes_ago))
    bad = path_of(tier, make_block(2)[0]).with_suffix(".kvb.bad.12345")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"set aside by a reader")
    assert not tier.contains(key) and not reads_back(tier, key, meta, payload) and not tier.published()
    tier.close()  # a last sweep
    assert not old_part.exists() and fresh_part.exists() and not bad.exists()


def test_the_janitor_deletes_the_least_recently_used_down_to_the_budget(tmp_path: Path):
    blocks = [make_block(i) for i in range(10)]
    tier = DiskTier(tmp_path, IDENTITY, GENEROUS)
    for age, block in enumerate(reversed(blocks)):  # block 0 the oldest
        assert tier.write(*block)
        os.utime(path_of(tier, block[0]), ns=(0, time.time_ns() - (age + 1) * 10**9))
    assert reads_back(tier, *blocks[0])  # a hit makes it the most recent
    tier.close()
    removed: list[BlockKey] = []
    tight = DiskTier(tmp_path, IDENTITY, budget_bytes=6 * FILE, on_removed=removed.append)  # 10 files: over
    tight.close()
    survivors = {blocks[i][0] for i in (0, 6, 7, 8, 9)}  # down to 90% of 6 files: the 5 most recent
    assert tight.published() == survivors and set(removed) == {blocks[i][0] for i in (1, 2, 3, 4, 5)}
    assert tight.bytes_used == 5 * FILE


def test_submit_never_blocks_on_a_stalled_writer(tmp_path: Path):
    entered, release = threading.Event(), threading.Event()

    def stall(key: BlockKey) -> None:
        entered.set()
        release.wait(10)

    tier = DiskTier(tmp_path, IDENTITY, budget_bytes=3 * FILE, max_queued=2, on_removed=stall)
    for i in range(4):  # over 95% of the budget: the writer thread sweeps, and stalls in on_removed
        tier.write(*make_block(i))
    assert entered.wait(10)
    queued = [make_block(i) for i in range(100, 150)]
    start = time.monotonic()
    for block in queued:
        tier.submit(*block)
    assert time.monotonic() - start < 0.5 and tier.dropped == 48
    release.set()
    assert tier.flush(timeout_s=10) == 0 and tier.written == 6
    tier.close()
    tier.submit(*queued[0])  # closed: dropped, not queued
    assert tier.dropped == 49


def test_caller_bugs_raise_and_filesystem_refusals_are_counted(tier: DiskTier):
    key, meta, payload = make_block(1)
    with pytest.raises(ValueError, match="hash_block"):
        tier.submit(key, BlockMeta(meta.parent, (1, 2, 3, 4)), payload)
    with pytest.raises(ValueError, match="contiguous uint8 CPU"):
        tier.write(key, meta, payload.view(torch.int32))
    shutil.rmtree(tier.root / "tmp")
    (tier.root / "tmp").write_text("not a directory")  # every write's part fails to open
    assert not tier.write(key, meta, payload) and tier.write_errors == 1 and not tier.contains(key)
    (tier.root / "tmp").unlink()
    (tier.root / "tmp").mkdir()
    assert tier.write(key, meta, payload) and reads_back(tier, key, meta, payload)


# -- two processes sharing one directory --------------------------------------------------------------------------
OURS, THEIRS = range(0, 500), range(350, 850)  # 150 blocks (30%) written by both
TIGHT = 200 * FILE


def _writer_main(shared: str, tight: str, ids: range, barrier, results) -> None:
    """One instance: submits its blocks into the shared directory, then reads back both instances' blocks; then does
    the same into a directory whose budget holds a fraction of them."""
    tier = DiskTier(shared, IDENTITY, GENEROUS)
    for i in ids:
        tier.submit(*make_block(i))
    left = tier.flush(timeout_s=60)
    barrier.wait()
    verified = sum(reads_back(tier, *make_block(i)) for i in range(OURS.start, THEIRS.stop))
    shared_report = {"left": left, "dropped": tier.dropped, "verified": verified, "bad": dict(tier.bad_files)}
    tier.close()
    barrier.wait()
    removed: list[BlockKey] = []
    tier = DiskTier(tight, IDENTITY, TIGHT, on_removed=removed.append)
    for i in ids:
        tier.submit(*make_block(i))
    tier.close(timeout_s=60)
    tight_report = {
        "removed": len(removed),
        "sweeps": tier.sweeps,
        "dropped": tier.dropped,
        "errors": tier.write_errors,
    }
    results.put((shared_report, tight_report))


@pytest.mark.slow
def test_two_processes_share_a_directory_within_its_budget(tmp_path: Path):
    shared, tight = tmp_path / "shared", tmp_path / "tight"
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    writers = [
        SPAWN.Process(target=_writer_main, args=(str(shared), str(tight), ids, barrier, results))
        for ids in (OURS, THEIRS)
    ]
    for writer in writers:
        writer.start()
    reports = [results.get(timeout=120) for _ in writers]
    for writer in writers:
        writer.join(timeout=30)
        assert writer.exitcode == 0
    everything = {i: make_block(i) for i in range(OURS.start, THEIRS.stop)}

    for shared_report, _ in reports:  # every block of both, verified by each
        assert shared_report == {"left": 0, "dropped": 0, "verified": len(everything), "bad": {}}
    tier = DiskTier(shared, IDENTITY, GENEROUS)
    assert tier.published() == {block[0] for block in everything.values()} and not any((tier.root / "tmp").iterdir())
    tier.close()

    for _, tight_report in reports:  # both janitors ran (at least their last sweep at close), nothing was refused
        assert tight_report["sweeps"] > 0 and tight_report["dropped"] == tight_report["errors"] == 0
    assert sum(tight_report["removed"] for _, tight_report in reports) >= len(everything) - TIGHT // FILE
    tier = DiskTier(tight, IDENTITY, GENEROUS)
    by_key = {block[0]: block for block in everything.values()}
    survivors = tier.published()
    files = [path_of(tier, key) for key in survivors]
    assert sum(path.stat().st_size for path in files) <= TIGHT + FILE
    assert all(path.stat().st_size == FILE for path in files)  # only whole files vanished
    assert all(reads_back(tier, *by_key[key]) for key in survivors) and not tier.bad_files
    assert not any((tier.root / "tmp").iterdir()) and not list(tier.root.rglob("*.bad.*"))
    tier.close()
