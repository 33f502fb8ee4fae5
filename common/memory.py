"""How much memory this process may still take, and how much it holds: what sizes a KV cache given no size
(runtime/engine/kv_budget.py) and what the memory reports print (runtime/engine/memory_report.py).

Available is the least of what the kernel can hand out without swapping (/proc/meminfo's MemAvailable) and what the
memory cgroups this process is in still allow: a container sees the host's MemAvailable, and a cache sized from that
alone is OOM-killed when it fills. A group's room is its limit less its usage, its inactive file pages not counted
as used (the kernel drops them before it fails an allocation; `docker stats` and the kubelet count usage so too):
a model file just read sits in the group's page cache and would otherwise look like memory taken. cgroup v2
(memory.max, memory.current) and v1 (memory.limit_in_bytes, memory.usage_in_bytes) are read, in this process's
group and every group above it, whose limits hold too."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
from pathlib import Path
from typing import Any

PROCFS = Path("/proc")
CGROUPFS = Path("/sys/fs/cgroup")
UNLIMITED = 2**60  # v1 writes "no limit" as the largest page-aligned int64; v2 writes "max"
# (folder under the cgroup mount, limit file, usage file, memory.stat key of the inactive file pages)
CGROUP_FILES = (
    ("", "memory.max", "memory.current", "inactive_file"),  # v2, the unified hierarchy
    ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),  # v1
)


def available_bytes(procfs: Path = PROCFS, cgroupfs: Path = CGROUPFS) -> int | None:
    """Bytes this process can still allocate and touch: MemAvailable, less where a memory cgroup allows less; None
    where neither says (not Linux)."""
    meminfo = _read(procfs / "meminfo") or ""
    line = next((row for row in meminfo.splitlines() if row.startswith("MemAvailable:")), None)
    available = int(line.split()[1]) * 1024 if line else None
    room = cgroup_room_bytes(procfs, cgroupfs)
    if room is None:
        return available
    return room if available is None else min(available, room)


def cgroup_room_bytes(procfs: Path = PROCFS, cgroupfs: Path = CGROUPFS) -> int | None:
    """The least room (limit - usage + inactive file pages) of the limited memory cgroups this process is in, from
    its own group up to the hierarchy's root; None when none is limited."""
    rooms = []
    for folder, limit_file, usage_file, inactive_key in CGROUP_FILES:
        mount = cgroupfs / folder if folder else cgroupfs
        for group in _groups(mount, _group_path(procfs, v2=not folder)):
            limit, usage = _number(group / limit_file), _number(group / usage_file)
            if limit is None or usage is None or limit >= UNLIMITED:
                continue
            rooms.append(max(0, limit - usage + _stat(group / "memory.stat", inactive_key)))
    return min(rooms) if rooms else None


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the kernel (glibc's malloc_trim): loading a model frees gigabytes of
    temporaries (dequantized and repacked tensors) that glibc otherwise keeps mapped, and counted as this process's
    (1.0 of 7.0 GiB after a 7B Q4_K_M file loads). A no-op where the C library has no malloc_trim."""
    trim = libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is not None:
        trim(0)


def libc_function(name: str, argtypes: tuple, restype: Any) -> Any:
    """The C library's function `name` with its signature set, through ctypes (which releases the GIL during the call
    and keeps errno), or None where the library or the function is missing (not Linux, not glibc)."""
    function = getattr(_libc(), name, None)
    if function is not None:
        function.argtypes, function.restype = argtypes, restype
    return function


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def drop_mapped_pages(mapping: mmap.mmap | None) -> None:
    """Lets a mapped file's pages leave this process's resident memory (MADV_DONTNEED): a GGUF file is read whole
    once, to repack its weights, and its pages would count in RSS ever after; what is read again (an embedding's
    rows) maps back from the page cache on its own."""
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def drop_pages_under(mapping: mmap.mmap | None, tensor: Any) -> None:
    """Lets the pages of `mapping` under `tensor` (a torch view of the mapped file) leave resident memory, as
    drop_mapped_pages does for the whole file: called as each weight is repacked, so loading holds the file and its
    repacked copy a weight at a time, not both whole (a 12 GB MXFP4 model peaked at 20 GB). Pages a neighbour still
    reads map back from the page cache; a tensor outside the mapping is left alone (MADV_DONTNEED would zero
    anonymous memory)."""
    import numpy as np  # here: the gateway imports this module for resident_bytes, and starts without numpy

    advise = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)
    if mapping is None or advise is None or not hasattr(mmap, "MADV_DONTNEED") or tensor.numel() == 0:
        return
    base = np.frombuffer(mapping, np.uint8).ctypes.data  # a view: no copy, and read-only maps allow it
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1
    start, end = tensor.data_ptr(), tensor.data_ptr() + span * tensor.element_size()
    if start < base or end > base + len(mapping):
        return
    page = mmap.PAGESIZE
    low, high = start // page * page, min(-(-end // page) * page, base + len(mapping) // page * page)
    if high > low:
        advise(low, high - low, mmap.MADV_DONTNEED)


def resident_bytes(procfs: Path = PROCFS, pid: int | str = "self", field: str = "VmRSS") -> int | None:
    """The process's resident set (VmRSS of /proc/PID/status; `field` VmHWM: its peak), None where procfs does not
    say (no such process, not Linux)."""
    status = _read(procfs / str(pid) / "status") or ""
    line = next((row for row in status.splitlines() if row.startswith(f"{field}:")), None)
    return int(line.split()[1]) * 1024 if line else None


def _group_path(procfs: Path, v2: bool) -> str | None:
    """This process's memory cgroup as /proc/self/cgroup names it: "0::/path" (v2), "N:memory:/path" or
    "N:cpu,memory:/path" (v1)."""
    for row in (_read(procfs / "self" / "cgroup") or "").splitlines():
        number, _, rest = row.partition(":")
        controllers, _, path = rest.partition(":")
        if (v2 and number == "0" and not controllers) or (not v2 and "memory" in controllers.split(",")):
            return path
    return None


def _groups(mount: Path, path: str | None) -> list[Path]:
    """The group folders from this process's up to the mount's root. In a cgroup namespace the mount's root is the
    process's own group and its path reads "/"; a path that is not under the mount (another namespace's) leaves the
    root alone."""
    if not mount.is_dir():
        return []
    here = mount / path.strip("/") if path else mount
    if not here.is_dir() or not os.path.realpath(here).startswith(os.path.realpath(mount)):
        here = mount
    groups = [here]
    while groups[-1] != mount:
        groups.append(groups[-1].parent)
    return groups


def _number(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    return UNLIMITED if text == "max" else int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    for row in (_read(path) or "").splitlines():
        name, _, value = row.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # absent here (another OS, no cgroup mounted) or not readable in this container
        return None
