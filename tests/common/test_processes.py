"""The processes sageLLM starts import the installed sageLLM, whatever folder the user stands in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sagellm.common.processes import python_module


@pytest.mark.slow  # two interpreters start
def test_a_sagellm_folder_in_the_working_directory_is_not_imported(tmp_path: Path) -> None:
    impostor = tmp_path / "sagellm"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise SystemExit('the impostor was imported')\n")

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    ours = run(python_module("sagellm.cli.main", "--version"))
    assert ours.returncode == 0 and ours.stdout.startswith("sagellm "), ours.stderr
    plain = run([sys.executable, "-m", "sagellm.cli.main", "--version"])
    assert "impostor" in plain.stderr  # without isolation the folder would have won


def test_every_python_child_is_started_through_the_isolated_command_builder() -> None:
    """A process of ours that `sys.executable -m` started by hand would import a `sagellm/` folder in the working
    directory; `python_module` is the one way to start one (the CLI start-up benchmark times the user's own `-m`)."""
    root = Path(__file__).resolve().parents[2]
    allowed = {root / "common" / "processes.py", root / "benchmarks" / "cli_startup.py"}
    by_hand = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("common", "backends", "runtime", "operators", "sagellm", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        if path not in allowed
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "sys.executable" in line and '"-m"' in line
    ]
    assert by_hand == []


def test_a_package_on_pythonpath_is_found_by_the_children(tmp_path: Path) -> None:
    """A sageLLM installed with `pip install --target DIR` and PYTHONPATH=DIR (or `--user`): the processes it starts
    find it as the parent does."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "probe_package.py").write_text("print('found on PYTHONPATH')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    child = subprocess.run(python_module("probe_package"), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert child.stdout == "found on PYTHONPATH\n", child.stderr
