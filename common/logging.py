"""structlog set-up shared by the CLI, servers and workers: one event per line on stderr, as JSON lines (for a log
file and a log search) or, on a terminal, structlog's console lines (for a person reading them)."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from sagellm.common.errors import InvalidInput

_ours: tuple[type, int] | None = None  # the wrapper class `configure_logging` made, and its level
LOG_FORMAT_ENV = "SAGELLM_LOG_FORMAT"  # how a process logs when not told: its workers read it too
LOG_FORMATS = ("auto", "console", "json")  # auto: console when stderr is a terminal, else json


def default_logging() -> None:
    """For a program that uses sageLLM as a library and set up no logging: our events go to stderr (stdout is the
    program's), warnings and above, as JSON lines (console lines on a terminal). A program that configured structlog
    itself keeps its own set-up. (structlog's own default prints to stdout and renders each traceback slowly with
    rich.)"""
    if not structlog.is_configured():
        configure_logging("warning")


def configure_logging(level: str = "info", *, log_format: str | None = None) -> None:
    """Our events at `level` and above on stderr, as `log_format` says (default: $SAGELLM_LOG_FORMAT, else auto)."""
    global _ours
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise InvalidInput(f"log level must be debug, info, warning or error, got {level!r}")
    log_format = log_format or os.environ.get(LOG_FORMAT_ENV) or "auto"
    if log_format not in LOG_FORMATS:
        raise InvalidInput(f"log format must be {', '.join(LOG_FORMATS)}, got {log_format!r}")
    json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    # JSON lines carry an exception as data (type, message, every frame), so a log search finds the cause of an
    # `internal` error; the console renderer prints the traceback itself.
    tail = (
        [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
        if json
        else [structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=(wrapper := structlog.make_filtering_bound_logger(numeric)),
        # sys.stderr is looked up per logger, not bound once: a replaced stderr (pytest's capture, a daemon's
        # redirect) must not leave loggers writing to a closed file.
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    _ours = (wrapper, numeric)


def logs(level: int) -> bool:
    """Whether an event at `level` is logged, when the set-up in force is ours (else whoever set up structlog
    decides: True). For the hot path, where building an event's fields costs more than the filtered call."""
    return _ours is None or structlog.get_config()["wrapper_class"] is not _ours[0] or level >= _ours[1]
