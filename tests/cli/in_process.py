"""`sagellm ARGS` run through the `main()` the console script calls, in the test's process: the commands that need
no process of their own are tested without paying a Python start-up (seconds on busy cores) each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from sagellm.cli.main import main


@dataclass
class Ran:
    code: int
    out: str
    err: str


def in_process(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, home: Path, *args: str) -> Ran:
    """With SAGELLM_HOME=`home`, 200 columns for rich tables and no admin key from the environment."""
    monkeypatch.setenv("SAGELLM_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("SAGELLM_ADMIN_KEY", raising=False)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return Ran(code, out, err)
