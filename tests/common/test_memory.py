"""The memory this process may still take: MemAvailable, less where a memory cgroup (v2 or v1, this process's group
or one above it) leaves less, its inactive file pages counted as room; and its resident set."""

from __future__ import annotations

from pathlib import Path

from sagellm.common.memory import available_bytes, cgroup_room_bytes, resident_bytes

GIB = 2**30


def _proc(root: Path, cgroup: str, available_kib: int | None = 8 * 2**20) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    meminfo = "MemTotal:       16000000 kB\n"
    if available_kib is not None:
        meminfo += f"MemAvailable:   {available_kib} kB\n"
    (proc / "meminfo").write_text(meminfo)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "status").write_text("Name:\tpython\nVmPeak:\t 9000 kB\nVmRSS:\t  524288 kB\n")
    return proc


def _group(folder: Path, limit: str, usage: int, stat: str = "", v1: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else ("memory.max", "memory.current")
    (folder / names[0]).write_text(limit + "\n")
    (folder / names[1]).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(stat)


def test_without_a_cgroup_limit_it_is_memavailable(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/user.slice\n")
    _group(tmp_path / "cg" / "user.slice", "max", 5 * GIB)
    assert cgroup_room_bytes(proc, tmp_path / "cg") is None
    assert available_bytes(proc, tmp_path / "cg") == 8 * GIB
    assert available_bytes(proc, tmp_path / "absent") == 8 * GIB


def test_a_v2_limit_leaves_its_room_inactive_file_pages_counted_free(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/docker/abc\n")
    _group(tmp_path / "cg" / "docker" / "abc", str(4 * GIB), 3 * GIB, f"anon 100\ninactive_file {GIB // 2}\n")
    assert cgroup_room_bytes(proc, tmp_path / "cg") == GIB + GIB // 2
    assert available_bytes(proc, tmp_path / "cg") == GIB + GIB // 2  # less than MemAvailable's 8 GiB


def test_a_parent_group_with_less_room_holds_too(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    _group(tmp_path / "cg" / "kubepods" / "pod1" / "ctr", "max", GIB)
    _group(tmp_path / "cg" / "kubepods" / "pod1", str(3 * GIB), 2 * GIB + GIB // 4)
    assert available_bytes(proc, tmp_path / "cg") == 3 * GIB // 4


def test_in_a_cgroup_namespace_the_mount_root_is_the_group(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/\n")
    _group(tmp_path / "cg", str(2 * GIB), GIB)
    assert available_bytes(proc, tmp_path / "cg") == GIB


def test_v1_limits_are_read_and_its_no_limit_ignored(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "5:cpu,memory:/docker/abc\n3:pids:/\n")
    _group(tmp_path / "cg" / "memory", "9223372036854771712", 9 * GIB, v1=True)
    _group(tmp_path / "cg" / "memory" / "docker" / "abc", str(6 * GIB), 2 * GIB, "total_inactive_file 1024\n", v1=True)
    assert cgroup_room_bytes(proc, tmp_path / "cg") == 4 * GIB + 1024


def test_the_room_is_never_below_zero_and_an_unknown_machine_says_none(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/a\n", available_kib=None)
    assert available_bytes(proc, tmp_path / "cg") is None
    _group(tmp_path / "cg" / "a", str(GIB), 2 * GIB)
    assert available_bytes(proc, tmp_path / "cg") == 0


def test_resident_bytes_reads_vmrss(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/\n")
    assert resident_bytes(proc) == GIB // 2
    assert resident_bytes(tmp_path / "nowhere") is None
    assert resident_bytes() > 0  # this process, from the real /proc


def test_a_packed_weights_file_pages_leave_and_other_memory_stays(tmp_path: Path) -> None:
    """drop_pages_under: a view of a mapped file lets its pages go (the process's file-backed resident memory falls
    by the view's size) and reads the same after; a tensor outside the mapping is left as it is (MADV_DONTNEED
    would zero anonymous memory)."""
    import mmap as mmap_module

    import numpy as np
    import torch

    from sagellm.common.memory import drop_pages_under

    path = tmp_path / "weights.bin"
    path.write_bytes(np.arange(32 << 20, dtype=np.uint8).tobytes())  # 32 MiB
    with path.open("rb") as f:
        mapping = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
    view = torch.from_numpy(np.frombuffer(mapping, np.uint8)[8 << 20 : 24 << 20])  # the middle 16 MiB
    expected = view.clone()
    assert int(view.sum()) == int(expected.sum())  # every page read: resident
    before = resident_bytes(field="RssFile")
    drop_pages_under(mapping, view)
    assert before - resident_bytes(field="RssFile") >= 15 << 20
    assert torch.equal(view, expected)  # read again from the page cache
    anonymous = torch.arange(1 << 20, dtype=torch.int32)
    drop_pages_under(mapping, anonymous)
    assert torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.int32))
