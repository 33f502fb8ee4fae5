"""Builds the native kernels' C sources with the system C compiler on first use and loads the library with ctypes.

Plain C and ctypes, not a torch extension: no torch headers to compile against. A build takes 10-25 s (most of it the
block linears' instantiations per layout and row count), once per machine and instruction set. One library per
variant (`isa.py`: avx512vnni, avx512, avx2, portable), each from explicit flags; the one this CPU runs best is
chosen at run time. The library is cached as $SAGELLM_HOME/kernels/sagellm_kernels-<variant>-<key>.so (default
~/.cache/sagellm; $SAGELLM_KERNELS_DIR instead when set), keyed by the sources and flags. Builds (each source compiled
on a core of its own) go to a temporary file renamed into place under a lock: processes starting at once (the workers
of a pipeline) compile it once and never load a half-written library. Any failure (no compiler, a failed build or load)
is logged once and reported as None: the CPU backend then runs its torch ops, it never fails the engine."""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import structlog

from sagellm.backends.native import isa
from sagellm.backends.native.isa import Variant
from sagellm.common.errors import Unavailable
from sagellm.common.home import kernels_dir
from sagellm.common.progress import stage

log = structlog.get_logger("sagellm.native")

HERE = Path(__file__).parent
SOURCES = tuple(
    HERE / c
    for c in (
        "decode_kernels.c",
        "decode_attention.c",
        "block_linear.c",
        "block_int8.c",
        "block_int16.c",
        "block_panel.c",
        "block_q8.c",
        "block_q8_amx.c",
        "prefill_attention.c",
        "decoder_layers.c",
        "delta_rule.c",
        "moe.c",
        "lora.c",
    )
)
HEADERS = tuple(
    HERE / h
    for h in ("vector_math.h", "kernels.h", "block_layouts.h", "block_readers.h", "mxfp4.h", "block_weight.h")
    + ("block_q8.h",)
)  # included by them
CFLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")  # and the variant's own (isa.py)
BUILD_TIMEOUT_S = 300  # a compiler's: the build takes 27-64 s on two idle cores (portable the longest); one stuck
# longer must not hold up the engine's start
COMPILE_ESTIMATE = "30 s to 2 min"  # what start-up says the build takes: 27-64 s on two idle cores, ~100 s on two busy
# ones; more cores shorten it down to block_linear.c's own time (one core's work)
DISABLE_ENV = "SAGELLM_NATIVE_KERNELS"  # "0" turns the native kernels off (the torch ops run instead)

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
# The block kernels (kernels.h): a linear and a dequantizer per block kind and interleave (8 or 16 outputs a group),
# and for the K-quants and MXFP4 a second linear that multiplies int8-quantized rows (block_int8.c).
_BLOCK_LINEAR = (_P, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _I32)  # x, x_row, w, bias, y, T, N, K, scratch, threads
_BLOCK_DEQUANTIZE = (_P, _I64, _I64, _I64, _P, _I32)  # w, K, first group, groups, out, threads
_BLOCK_KINDS = {"q4": ("f32",), "q8": ("f32",), "q4k": ("f32", "i8"), "q5k": ("f32", "i8"), "q6k": ("f32", "i8")}
_BLOCK_KINDS |= {"mxfp4": ("f32", "i8")}
_BLOCK_PROTOTYPES = {
    f"{op}_{kind}x{width}_{x_type}": args
    for kind, x_types in _BLOCK_KINDS.items()
    for width in (8, 16)
    for op, args, op_x_types in (("linear", _BLOCK_LINEAR, x_types), ("dequantize", _BLOCK_DEQUANTIZE, ("f32",)))
    for x_type in op_x_types
}
# The linears on x rounded to int8 alone (block_q8.c, --int8-activations): Q4_0 / Q4_1 and Q6_K in their chunks,
# Q4_K and Q5_K in their own layouts.
_Q8_LAYOUTS = ("q4c", "q4k", "q5k", "q6c")
_BLOCK_PROTOTYPES |= {f"linear_{kind}x{width}_q8": _BLOCK_LINEAR for kind in _Q8_LAYOUTS for width in (8, 16)}
# Each exported function's arguments, in the order kernels.h and the C files declare them.
PROTOTYPES: dict[str, tuple[type, ...]] = {
    "rmsnorm_f32": (_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _F32, _I32),
    "head_rmsnorm_f32": (_P, _I64, _I64, _P, _P, _I64, _I64, _I64, _F32, _I32),
    "rope_f32": (_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I32),
    "gated_rmsnorm_f32": (_P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _F32, _I32),
    "silu_mul_f32": (_P, _I64, _P, _I64, _I64, _I32),
    "write_kv_f32": (_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64),
    "linear_f32": (_P, _I64, _P, _P, _P, _I64, _I64, _I64),
    "paged_decode_attention_f32": (
        (_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64)
        + (_F32, _I64, _F32, _P, _I32)  # scale, window, softcap, sinks, threads
    ),
    "paged_prefill_attention_f32": (
        (_P, _I64, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64)
        + (_F32, _I64, _F32, _P, _P, _I32)  # scale, window, softcap, sinks, scratch, threads
    ),
    "decoder_layers_f32": (
        (_P, _I64, _P, _P, _P, _P, _P)  # layers, count, dims, hidden, residual and their outputs
        + (_P, _P, _P, _I64, _P, _P, _P, _I64)  # positions, slots, tables, max_blocks, lens, state starts/slots, rows
        + (_P, _P, _I64)  # the sliding-window layers' own slots, tables and max_blocks (or NULL)
        + (_P, _I32, _I32, _I32)  # workspace, threads
        + (_P, _P, _I64, _P)  # the layers' LoRA adapters (or NULL), the rows' slots, the rank, scratch
    ),
    "lora_add_f32": (_P, _I64, _P, _I64, _I64, _P, _I64, _P, _I64, _I64, _P, _I32),
    "decoder_layers_workspace": (_P, _I64),
    "moe_f32": (
        (_P, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64)  # x, rows, router, its bias, E, k, normalize, experts
        + (_P, _P, _P, _P, _I64, _I64, _I64, _F32, _F32)  # weights, biases, H, I, activation, alpha, limit
        + (_P, _P, _I32)  # out, workspace, threads
    ),
    "moe_workspace": (_I64, _I64, _I64, _I64),
    "sigmoid_f32": (_P, _I64, _P, _I64, _I64, _I32),
    "gated_delta_net_f32": (
        (_P, _I64, _P, _I64, _P, _I64, _P, _P, _I64)  # x, a, b, starts, slots, sequences
        + (_P, _P, _P, _P, _P, _P)  # states, weights, out
        + (_I64, _I64, _I64, _I64, _I64, _I64, _P, _I32)  # Hk, Dk, Hv, Dv, tiled, K, scratch, threads
    ),
    **_BLOCK_PROTOTYPES,
}
PROTOTYPES["q8_amx"] = (_I32,)  # whether the q8 linears use AMX's tiles; 0 / 1 turns that off / on, -1 asks
RETURNS: dict[str, type] = {"decoder_layers_workspace": _I64, "moe_workspace": _I64, "q8_amx": _I32}  # others: void


class NativeBuildError(Unavailable, RuntimeError):
    """The native kernels could not be compiled or loaded here; the message says why in one line."""


def library_key(sources: tuple[Path, ...], variant: Variant) -> str:
    """Hash of what the built library depends on: the sources (and headers), the flags and the machine's
    architecture."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    digest.update(" ".join((*CFLAGS, *variant.cflags)).encode())
    digest.update(platform.machine().encode())
    return digest.hexdigest()[:16]


def library_name(variant: Variant) -> str:
    return f"sagellm_kernels-{variant.name}-{library_key(SOURCES + HEADERS, variant)}.so"


def build(directory: Path | None = None, variant: Variant | None = None) -> Path:
    """The compiled library's path for `variant` (default: the one this CPU runs, `isa.chosen()`), compiling it
    first if these sources and flags have none yet. Any variant compiles on any x86 machine; only loading needs the
    CPU to have its instructions."""
    directory = directory or kernels_dir()
    variant = variant or isa.chosen()
    target = directory / library_name(variant)
    if target.exists():
        return target
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise NativeBuildError("no C compiler (gcc or cc) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    # The workers of a pipeline start at once: one compiles while the others wait on the lock, then find the library.
    with open(directory / f".{target.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _compile(compiler, variant, directory, target)
    return target


def _compile(compiler: str, variant: Variant, directory: Path, target: Path) -> None:
    """Compiles each source to an object at once (one compiler per core: the block linears' file alone takes most
    of a serial build), then links them into `target`."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as scratch:
        objects = [Path(scratch) / f"{source.stem}.o" for source in SOURCES]
        commands = [[compiler, *CFLAGS, *variant.cflags, "-c", "-o", str(o), str(s)] for s, o in zip(SOURCES, objects)]
        partial = Path(scratch) / target.name
        steps = len(SOURCES) + 1  # a compile per source, then the link
        with stage(f"compiling the CPU kernels for {variant.name}, once per machine ({COMPILE_ESTIMATE})"):
            with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
                compiles = [pool.submit(_run, command, source.name) for command, source in zip(commands, SOURCES)]
                finished = as_completed(compiles)
                for done in range(len(compiles)):  # each wait a stage of its own: the display counts the steps
                    with stage(f"{done} of {steps} steps done"):
                        failure = next(finished).result()
                    if failure:
                        raise NativeBuildError(failure)
            link = [compiler, *CFLAGS, "-o", str(partial), *map(str, objects), "-lm"]
            with stage(f"{steps - 1} of {steps} steps done: linking"):
                failure = _run(link, "the link of " + ", ".join(source.name for source in SOURCES))
            if failure:
                raise NativeBuildError(failure)
        os.chmod(partial, 0o755)  # the compiler's umask-made mode may hide it from other users of a shared cache
        os.replace(partial, target)
    log.info("native_kernels_built", path=str(target))


def _run(command: list[str], what: str) -> str | None:
    """Runs one compiler command on `what` (a source, or the link); the failure's one-line reason naming it, or
    None."""
    compiler = command[0]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{compiler} took over {BUILD_TIMEOUT_S} s on {what}"
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines() or ["(no output)"]
    first_error = next((line for line in lines if "error" in line), lines[0])
    return f"{compiler} failed on {what} (exit {done.returncode}): {first_error}"


def load(path: Path, variant: Variant | None = None) -> ctypes.CDLL:
    """Opens the library and declares every function's argument types, so ctypes converts arguments correctly."""
    try:
        library = ctypes.CDLL(str(path))
        for name, argtypes in PROTOTYPES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, RETURNS.get(name)
    except (OSError, AttributeError) as exc:
        raise NativeBuildError(f"cannot load {path}: {exc}") from exc
    library.isa = (variant or isa.chosen()).name
    if os.environ.get(isa.AMX_ENV) == "0":
        library.q8_amx(0)
    return library


def native_library(variant: Variant | None = None) -> ctypes.CDLL | None:
    """The loaded library of `variant` (default: the one this CPU runs best), built on first use; None when turned
    off by $SAGELLM_NATIVE_KERNELS=0 or unavailable."""
    return None if os.environ.get(DISABLE_ENV) == "0" else _build_and_load(variant or isa.chosen())


@functools.cache
def _build_and_load(variant: Variant) -> ctypes.CDLL | None:
    """Once per process and variant, so an unavailable library is tried and logged once, not per engine."""
    try:
        return load(build(variant=variant), variant)
    except (NativeBuildError, OSError) as exc:
        log.warning("native_kernels_unavailable", reason=str(exc), fallback="torch ops")
        return None
