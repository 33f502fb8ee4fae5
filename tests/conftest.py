"""Shared test set-up: every test starts from structlog's default configuration, so a test that runs the CLI in
process (which configures logging for a user: JSON on stderr, warnings only) cannot hide the events a later test
captures."""

from __future__ import annotations

import pytest
import structlog

from sagellm.common.openmp import prefer_short_spin

prefer_short_spin()  # the suite is a front end too: set before any test module imports torch


@pytest.fixture(autouse=True)
def _default_structlog():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
