"""Where sageLLM keeps its files on this machine: $SAGELLM_HOME, by default ~/.cache/sagellm.

    models/     the model cache (downloads, wheel models)
    kernels/    native CPU kernels compiled for this CPU ($SAGELLM_KERNELS_DIR instead, when set)
    gateway/    a local gateway's state: admin key, sessions, pid, log
    keys/       the key of a secure pipeline run, for the workers started by hand on other hosts
    indexes/    retrieval indexes by name (`runtime.rag`), each a folder: its FAISS index and its chunks
    chat_history  the lines typed at `sagellm chat`'s prompt (readline's history, the newest 1,000)

One function per folder, so a user who moves the home moves everything, and no floor computes the path twice."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SAGELLM_HOME"
# The compiled kernels depend on the CPU and the sources only (build.py keys them so), not on whose home it is: homes
# made for a run (a test's, a container's) can share one build, as TRITON_CACHE_DIR shares triton's.
KERNELS_ENV = "SAGELLM_KERNELS_DIR"
DEFAULT_HOME = "~/.cache/sagellm"


def sagellm_home() -> Path:
    """Read at every call, not at import: tests and users change $SAGELLM_HOME at run time."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def models_dir() -> Path:
    return sagellm_home() / "models"


def kernels_dir() -> Path:
    return Path(os.environ[KERNELS_ENV]).expanduser() if os.environ.get(KERNELS_ENV) else sagellm_home() / "kernels"


def gateway_dir() -> Path:
    return sagellm_home() / "gateway"


def keys_dir() -> Path:
    return sagellm_home() / "keys"


def indexes_dir() -> Path:
    return sagellm_home() / "indexes"


def chat_history_file() -> Path:
    return sagellm_home() / "chat_history"
