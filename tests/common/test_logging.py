"""The JSON logs a user's processes write: one event per line on stderr, an exception carried as data."""

from __future__ import annotations

import json

import pytest
import structlog

from sagellm.common.logging import configure_logging


def test_an_exception_is_logged_with_its_type_message_and_frames(capsys: pytest.CaptureFixture) -> None:
    configure_logging("info")
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("test").exception("step_failed", request_id="r1")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    (exception,) = line["exception"]
    assert line["event"] == "step_failed" and line["request_id"] == "r1" and line["level"] == "error"
    assert exception["exc_type"] == "ValueError" and exception["exc_value"] == "boom" and exception["frames"]


def test_a_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")
