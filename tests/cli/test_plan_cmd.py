"""`sagellm plan MODEL`: big models as config.json files written here (no weights), planned for GPUs described on the
command line and for this machine (`--devices auto`: its CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.in_process import in_process
from tests.cli.test_cli import run
from tests.parallel.known_models import write_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {
        name: write_config(root, name) for name in ("SmolLM2-135M", "Llama-3-70B", "Llama-3.1-405B", "Mixtral-8x7B")
    }


def test_70b_on_an_8_gpu_node(models, tmp_path):
    result = run("plan", str(models["Llama-3-70B"] / "config.json"), "--gpus", "8", "--gpu-mem", "80", home=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    header = next(line for line in out.splitlines() if " tp " in line).split()
    assert [cell for cell in header if cell.isalpha()] == ["tp", "pp", "dp", "ep", "weights", "KV", "fits", "note"]
    assert "splits (GiB per device)" in out
    assert "recommended: tp=4 pp=1 dp=2 ep=1" in out
    assert "Llama-3-70B has 70.6B parameters" in " ".join(out.split())
    assert "needs 133.9 GiB > 72 usable" in out  # the whole model on one GPU, considered and refused


def test_405b_over_four_nodes(models, tmp_path, capsys, monkeypatch):
    args = ("plan", str(models["Llama-3.1-405B"]), "--gpus", "32", "--gpu-mem", "80", "--nodes", "4")
    result = in_process(capsys, monkeypatch, tmp_path, *args)
    assert result.code == 0 and "recommended: tp=8 pp=4 dp=1 ep=1" in result.out
    same = in_process(capsys, monkeypatch, tmp_path, "plan", str(models["Llama-3.1-405B"]), *args[4:6], "--nodes", "4")
    assert same.code == 0 and "recommended: tp=8 pp=4 dp=1 ep=1" in same.out  # --gpu-mem 80 --nodes 4: 8 per node


def test_a_mixtral_config_plans_its_experts(models, tmp_path, capsys, monkeypatch):
    """The experts the config reader finds in config.json reach the planner: expert parallel, active counts."""
    result = in_process(
        capsys, monkeypatch, tmp_path, "plan", str(models["Mixtral-8x7B"]), "--gpus", "8", "--gpu-mem", "80"
    )
    out = " ".join(result.out.split())
    assert result.code == 0 and "recommended: tp=1 pp=1 dp=8 ep=8" in out
    assert "46.7B parameters (12.9B active per token: 2 of 8 experts)" in out


def test_this_machine(models, tmp_path, capsys, monkeypatch):
    small = in_process(capsys, monkeypatch, tmp_path, "plan", str(models["SmolLM2-135M"]), "--devices", "auto")
    assert small.code == 0 and "recommended: tp=1 pp=1 dp=1 ep=1" in small.out
    assert "Devices: 1 CPU of" in " ".join(small.out.split()) and "in fp32" in small.out
    big = in_process(capsys, monkeypatch, tmp_path, "plan", str(models["Llama-3.1-405B"]))
    assert big.code == 2 and "no" in big.out  # the splits considered, then why none fits
    message = " ".join(big.err.split())
    assert message.startswith("sagellm plan: error: Llama-3.1-405B has 405.9B parameters: 1511.9 GiB of weights")
    assert "No split over 1 CPU of" in message


@pytest.mark.parametrize(
    "args, error",
    [
        (("--gpus", "8"), "--gpu-mem GIB is needed"),
        (("--gpu-mem", "80"), "--gpu-mem needs --gpus N"),
        (("--devices", "auto", "--gpus", "8", "--gpu-mem", "80"), "--devices auto reads this machine"),
        (("--gpus", "12", "--gpu-mem", "80"), "12 devices do not split into fast-link groups of 8"),
        (("--gpus", "8", "--gpu-mem", "80", "--nodes", "3"), "8 GPUs do not split into 3 nodes"),
    ],
)
def test_device_flags_that_do_not_add_up(models, tmp_path, capsys, monkeypatch, args, error):
    result = in_process(capsys, monkeypatch, tmp_path, "plan", str(models["Llama-3-70B"]), *args)
    assert result.code == 2 and error in result.err


def test_help_imports_no_torch():
    probe = "import sys; from sagellm.cli import plan_cmd; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_shipped_70b_example_gives_what_the_readme_shows(tmp_path, capsys, monkeypatch):
    example = Path(__file__).resolve().parents[2] / "examples" / "llama-3-70b" / "config.json"
    args = ("plan", str(example), "--gpus", "16", "--gpu-mem", "24", "--gpus-per-node", "8")
    result = in_process(capsys, monkeypatch, tmp_path, *args)
    readme = (Path(__file__).resolve().parents[2] / "docs" / "parallelism.md").read_text()
    shown = readme.split("recommended: tp=8 pp=2 dp=1 ep=1\n", 1)[1].split("```", 1)[0]
    assert result.code == 0 and "recommended: tp=8 pp=2 dp=1 ep=1" in result.out
    assert " ".join(shown.split()) in " ".join(result.out.split())
