"""The engine's threads follow the cores other programs leave it: the load read from /proc/stat less the process's own
time, the count chosen from it with a gap that keeps a steady load from flipping it, the cores counted through the
affinity, the physical cores and a cgroup quota."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sagellm.common.affinity import cpu_quota, default_thread_count, usable_core_count, usable_cores
from sagellm.common.core_load import CoreLoad
from sagellm.runtime.engine.thread_governor import INTERVAL_S, ThreadGovernor

TICKS = os.sysconf("SC_CLK_TCK")


class StatFile:
    """A /proc/stat of two cores whose busy time the test advances, as the kernel's would."""

    def __init__(self, path: Path) -> None:
        self.path, self.busy = path, [0, 0]
        self.write()

    def add(self, seconds: float, core: int = 0) -> None:
        self.busy[core] += round(seconds * TICKS)
        self.write()

    def write(self) -> None:
        lines = [f"cpu  {sum(self.busy)} 0 0 1000 0 0 0 0 0 0"]
        lines += [f"cpu{i} {busy} 0 0 500 0 0 0 0 0 0" for i, busy in enumerate(self.busy)]
        self.path.write_text("\n".join([*lines, "intr 0", "ctxt 0"]) + "\n")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_load_of_others_is_the_cores_busy_time_less_this_process(tmp_path: Path) -> None:
    stat = StatFile(tmp_path / "stat")
    load = CoreLoad([0, 1], stat.path)
    started, own = time.monotonic(), time.process_time()
    while time.process_time() - own < 0.2:  # this process busy: in the cores' time, and not the others'
        pass
    spent, elapsed = time.process_time() - own, time.monotonic() - started
    stat.add(spent + 0.5 * elapsed)  # what the kernel would count: ours, and half a core of someone else's
    assert load.sample() == pytest.approx(0.5, abs=0.1)


def test_a_core_missing_from_proc_stat_means_no_reading(tmp_path: Path) -> None:
    stat = StatFile(tmp_path / "stat")
    assert CoreLoad.of([0, 1], stat.path) is not None
    assert CoreLoad.of([0, 7], stat.path) is None
    assert CoreLoad.of([0], tmp_path / "absent") is None


@pytest.mark.slow
def test_a_busy_program_beside_this_one_is_read_from_the_real_proc_stat() -> None:
    load = CoreLoad(usable_cores())
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started
        load.sample()
        time.sleep(1.0)
        assert load.sample() >= 0.5  # a core's worth, less what the rest of the machine takes from it
    finally:
        spinner.kill()
        spinner.wait()


def governor(tmp_path: Path, ceiling: int = 2) -> tuple[ThreadGovernor, StatFile, list[float]]:
    """A governor over the test's stat file and clock: each `tick(others)` passes a sample period in which other
    programs used `others` cores."""
    stat, now = StatFile(tmp_path / "stat"), [0.0]
    load = CoreLoad([0, 1], stat.path, clock=lambda: now[0])
    return ThreadGovernor(ceiling, 2, load, clock=lambda: now[0]), stat, now


def test_threads_drop_while_a_busy_program_shares_the_cores_and_come_back_after(tmp_path: Path, threads) -> None:
    gov, stat, now = governor(tmp_path)
    torch.set_num_threads(2)
    counts = []
    for others in [0.1] * 4 + [1.1] * 4 + [0.1] * 6:
        now[0] += INTERVAL_S
        stat.add(others * INTERVAL_S)
        counts.append(gov.fit())
    assert counts[:4] == [2] * 4
    assert counts[5:8] == [1, 1, 1]  # believed within two samples
    assert counts[-1] == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == gov.threads


def test_between_samples_the_count_is_not_reconsidered(tmp_path: Path, threads) -> None:
    gov, stat, now = governor(tmp_path)
    stat.add(2.0)  # both cores busy, but the period has not passed
    now[0] += INTERVAL_S / 2
    assert gov.fit() == 2


@pytest.mark.parametrize(
    ("threads_now", "free", "fitted"),
    [
        (2, 1.6, 2),  # others take 0.4 core: two threads still each nearly have one
        (2, 1.4, 1),  # others take 0.6: the second thread would wait for its core
        (1, 1.6, 1),  # not enough to come back to two (the gap)
        (1, 1.75, 2),
        (8, 6.0, 6),  # eight cores, others use two
        (6, 6.6, 6),
        (6, 7.9, 8),
        (2, 0.1, 1),  # never below one
        (2, 2.0, 2),  # never above the ceiling
    ],
)
def test_the_count_for_the_cores_left(tmp_path: Path, threads_now: int, free: float, fitted: int) -> None:
    gov, _, _ = governor(tmp_path, ceiling=max(threads_now, 8 if threads_now > 2 else 2))
    gov.threads = threads_now
    assert gov.fitting(free) == fitted


def test_the_cores_counted_through_affinity_physical_cores_and_quota(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path / "v1") == 0.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path / "v1") is None

    cpus = tmp_path / "cpus"
    for cpu in usable_cores():  # every usable CPU a hyperthread of one core
        (cpus / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (cpus / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(f"0-{max(usable_cores())}\n")
    assert usable_core_count(tmp_path / "none", cpus) == 1
    assert usable_core_count(tmp_path / "none", tmp_path / "no-topology") == len(usable_cores())
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert usable_core_count(v2, tmp_path / "no-topology") == 1


def test_omp_num_threads_is_the_default_count_where_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for named, count in (("3", 3), (" 1 ", 1), ("0", usable_core_count()), ("two", usable_core_count())):
        monkeypatch.setenv("OMP_NUM_THREADS", named)
        assert default_thread_count() == count, named
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_thread_count() == usable_core_count()
