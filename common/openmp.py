"""How OpenMP's worker threads wait between parallel regions, for the processes sageLLM starts.

libgomp reads the setting once, when torch loads it, so a front end (the CLI, a worker, the test suite) calls
`prefer_short_spin()` before anything imports torch; importing sageLLM as a library changes nothing in the process.

Spinning long (libgomp's default 300,000 spins, or forever under ACTIVE) turns every op into a scheduler time slice as
soon as anything else shares the cores: steps 25-100x slower on 2 cores. Sleeping at once (PASSIVE) pays a futex
wake-up for each of the ~120 regions of a step, slower still while a load generator or the gateway's own thread keeps
waking on the other core. A short spin catches the next region of the same step: W1 at 16 concurrent through the
gateway runs at 150 tok/s with 5,000 spins against PASSIVE's 129 (a busy process on one of the two cores costs a
decode step 150 ms instead of PASSIVE's 88). With the faster kernels of an AVX-512 machine a step's regions come
closer together and the Python between them takes relatively longer, so 5,000 spins let the worker fall asleep
inside a step; 30,000 keep it awake there: on an AMD EPYC, through the gateway with vLLM's client, W1 at 16
concurrent serves ~5% more tokens a second than with 5,000, single-stream TPOT and a warm 512-token prefix's TTFT
are ~20% shorter, and `sagellm run graphs/pd.yaml` of 8 requests (two worker processes sharing the cores) ends ~15%
sooner (benchmarks/README.md has the figures)."""

from __future__ import annotations

import os

SPIN_COUNT = "30000"


def prefer_short_spin() -> None:
    """PASSIVE with a 30,000-spin grace, unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT (theirs wins)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
