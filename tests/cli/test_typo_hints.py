"""A misspelled flag, command or graph name is answered with the one it was probably meant to be: a flag under the
usage of the command it was given to (not the top-level one), a graph with the shipped graphs' names."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.cli.main import main
from tests.cli.in_process import in_process


def _refused(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """What argparse said refusing `argv` (it exits 2)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_misspelled_flag_names_the_one_meant_under_its_commands_usage(capsys):
    err = _refused(capsys, "chat", "--max-tokns", "5")
    assert err.startswith("usage: sagellm chat") and "--max-tokns: did you mean --max-tokens?" in err
    err = _refused(capsys, "gateway", "start", "--prot", "8000")
    assert err.startswith("usage: sagellm gateway start") and "did you mean --port?" in err
    err = _refused(capsys, "chat", "--max-tokens=5", "--temprature=0")
    assert "did you mean --temperature?" in err


def test_a_flag_like_no_other_gets_no_guess(capsys):
    err = _refused(capsys, "chat", "--zzzzzz")
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err


def test_a_misspelled_command_names_the_one_meant(capsys):
    assert "did you mean 'serve'?" in _refused(capsys, "serv")
    assert "did you mean 'start'?" in _refused(capsys, "gateway", "strat")


@pytest.mark.slow  # `run` and `serve` import the runtime: seconds
def test_a_misspelled_graph_names_the_shipped_graphs_and_the_one_meant(capsys, monkeypatch, tmp_path: Path):
    ran = in_process(capsys, monkeypatch, tmp_path, "run", "pdd", "--prompt", "hi")
    assert ran.code == 2 and "did you mean pd?" in ran.err and "colocated" in ran.err
    ran = in_process(capsys, monkeypatch, tmp_path, "run", "graphs/colocatd.yaml", "--prompt", "hi")
    assert ran.code == 2 and "did you mean colocated?" in ran.err
    ran = in_process(capsys, monkeypatch, tmp_path, "serve", "pdd", "--port", "0")
    assert ran.code == 2 and "did you mean the graph pd?" in ran.err
