"""The JSON logs a user's processes write: one event per line on stderr, an exception carried as data."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from sagellm.common.logging import configure_logging, logs


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


LIBRARY_USE = """
import structlog
from sagellm.common.logging import default_logging
default_logging()
log = structlog.get_logger("sagellm.test")
log.info("quiet")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("step_failed")
print("the program's own output")
"""
USER_CONFIGURED = """
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory())  # the program's own choice: stdout
from sagellm.common.logging import default_logging
default_logging()
structlog.get_logger().warning("kept")
"""


def test_a_library_user_gets_our_warnings_on_stderr_and_keeps_stdout() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LIBRARY_USE], capture_output=True, text=True, check=True)
    assert done.stdout == "the program's own output\n"
    (line,) = [json.loads(x) for x in done.stderr.splitlines()]  # info is below the default level
    assert line["event"] == "step_failed" and line["exception"][0]["exc_type"] == "ValueError"
    kept = subprocess.run([sys.executable, "-c", USER_CONFIGURED], capture_output=True, text=True, check=True)
    assert "kept" in kept.stdout and not kept.stderr


def test_logs_says_what_our_set_up_filters_and_defers_to_anyone_elses() -> None:
    configure_logging("warning")
    assert not logs(logging.INFO) and logs(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))  # a program's own
    assert logs(logging.INFO)
