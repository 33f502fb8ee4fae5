"""The machine's side of `sagellm bench roofline`: how fast this CPU reads memory and multiplies, with one thread and
with all of them, from small C kernels compiled here with the system `cc` (cached in the kernels folder).

- read bandwidth: each thread sums its own slice of a float32 array far larger than the caches (1 GiB by default,
  filled first so every page is real memory, not the shared zero page), 8 independent vector accumulators, 512-bit
  loads where the CPU has AVX-512 (GCC's target_clones picks at load time), every pass over the whole array; the
  best of `repeats` calls of about `seconds` each. C rather than torch: `torch.sum` splits the array among torch's
  own threads and adds its dispatch, and what is wanted is the plain rate loads reach with a chosen thread count,
  which a sum kernel of this shape reaches within a few percent of a STREAM-style read (loads only; writes would
  count both ways). GB/s are 10^9 bytes;
- peak arithmetic: register-only microkernels, 16 independent accumulator chains (enough to cover each unit's
  latency times its ports on current x86 cores), no memory traffic: fp32 FMA (vfmadd, 512- or 256-bit), bf16 dot
  products (vdpbf16ps, AVX512-BF16: 2 multiply-adds per fp32 lane), int8 dot products (vpdpbusd, AVX-512 VNNI or
  AVX-VNNI: 4 per int32 lane) and int16 ones (vpdpwssd, AVX-512 VNNI: 2 per lane, what the quantized linears'
  prefill runs), and AMX's tile multiplies (tdpbusd on four tiles of sums, 16,384 multiply-adds each, what
  `--int8-activations`' prefill runs where the CPU has them), each counted as 2 operations per multiply-add. A CPU
  without the instructions gets no number ("not available"), never an emulation's.

Threads are pthreads pinned one per CPU of this process's affinity mask, so "all" is the cores the engine may use."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sagellm.backends.native.isa import cpu_flags
from sagellm.common.errors import Unavailable
from sagellm.common.home import kernels_dir

C_SOURCE = r"""
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

enum { MAX_THREADS = 1024 };
typedef float v16 __attribute__((vector_size(64), aligned(64)));

__attribute__((target_clones("avx512f", "avx2", "default")))
static double read_slice(const float *p, int64_t n, int64_t passes) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    const v16 *v = (const v16 *)p;
    int64_t m = n / 128;
    for (int64_t pass = 0; pass < passes; pass++)
        for (int64_t i = 0; i < m; i++) {
            a0 += v[8 * i]; a1 += v[8 * i + 1]; a2 += v[8 * i + 2]; a3 += v[8 * i + 3];
            a4 += v[8 * i + 4]; a5 += v[8 * i + 5]; a6 += v[8 * i + 6]; a7 += v[8 * i + 7];
        }
    v16 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    double total = 0;
    for (int j = 0; j < 16; j++) total += s[j];
    return total;
}

/* N independent chains c[j] = STEP, held in registers (N + 2 operands fit: 32 zmm, 16 ymm), then every lane
   summed so no lane's work can be dropped. */
#define CHAIN_LOOP(N, TYPE, LANE, INIT, STEP)                            \
    TYPE c[N];                                                         \
    for (int j = 0; j < N; j++) c[j] = INIT;                           \
    for (int64_t i = 0; i < iters; i++) {                              \
        _Pragma("GCC unroll 16") for (int j = 0; j < N; j++) c[j] = STEP; \
    }                                                                  \
    double total = 0;                                                  \
    for (int j = 0; j < N; j++) {                                      \
        LANE lanes[sizeof(TYPE) / sizeof(LANE)];                       \
        memcpy(lanes, &c[j], sizeof lanes);                            \
        for (unsigned k = 0; k < sizeof(TYPE) / sizeof(LANE); k++) total += (double)lanes[k]; \
    }                                                                  \
    return total;

__attribute__((target("avx512f,fma")))
static double fma512(int64_t iters) {
    __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
    CHAIN_LOOP(16, __m512, float, _mm512_set1_ps((float)j), _mm512_fmadd_ps(c[j], a, b))
}

__attribute__((target("avx2,fma")))
static double fma256(int64_t iters) {
    __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
    CHAIN_LOOP(12, __m256, float, _mm256_set1_ps((float)j), _mm256_fmadd_ps(c[j], a, b))
}

__attribute__((target("avx512f,avx512bf16")))
static double bf16dot512(int64_t iters) {
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3580);  /* 1, 2^-20 */
    CHAIN_LOOP(16, __m512, float, _mm512_setzero_ps(), _mm512_dpbf16_ps(c[j], a, b))
}

__attribute__((target("avx512f,avx512vnni")))
static double vnni512(int64_t iters) {
    __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
    CHAIN_LOOP(16, __m512i, int32_t, _mm512_set1_epi32(j), _mm512_dpbusd_epi32(c[j], a, b))
}

__attribute__((target("avx512f,avx512vnni")))
static double vnni16x512(int64_t iters) {
    __m512i a = _mm512_set1_epi16(3), b = _mm512_set1_epi16(-5);
    CHAIN_LOOP(16, __m512i, int32_t, _mm512_set1_epi32(j), _mm512_dpwssd_epi32(c[j], a, b))
}

__attribute__((target("avx2,avxvnni")))
static double vnni256(int64_t iters) {
    __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5);
    CHAIN_LOOP(12, __m256i, int32_t, _mm256_set1_epi32(j), _mm256_dpbusd_avx_epi32(c[j], a, b))
}

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#include <sys/syscall.h>
#include <unistd.h>
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t bytes_per_row[16]; uint8_t rows[16]; } tiles_t;

/* Four tiles of 16 x 16 int32 sums, each tdpbusd 16 rows x 64 bytes by 16 x 64: 16,384 multiply-adds. The thread
   asks Linux for the tile state first; NAN where it is refused. */
__attribute__((target("amx-tile,amx-int8")))
static double amx_int8(int64_t iters) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) return __builtin_nan("");
    tiles_t config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.bytes_per_row[t] = 64;
    _tile_loadconfig(&config);
    static const int8_t a[16 * 64] __attribute__((aligned(64))) = {1, 2, 3};
    _tile_loadd(4, a, 64); _tile_loadd(5, a, 64); _tile_loadd(6, a, 64); _tile_loadd(7, a, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t i = 0; i < iters; i++) {
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
    }
    int32_t sums[4][256] __attribute__((aligned(64)));
    _tile_stored(0, sums[0], 64); _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64); _tile_stored(3, sums[3], 64);
    _tile_release();
    double total = 0;
    for (int t = 0; t < 4; t++) for (int j = 0; j < 256; j++) total += sums[t][j];
    return total;
}
#else
static double amx_int8(int64_t iters) { (void)iters; return __builtin_nan(""); }
#endif

typedef struct { int32_t kind; const float *data; int64_t n, count; int32_t cpu; double result; } job_t;

static void *work(void *arg) {
    job_t *job = arg;
    if (job->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(job->cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
    switch (job->kind) {
    case 0: job->result = read_slice(job->data, job->n, job->count); break;
    case 1: job->result = fma512(job->count); break;
    case 2: job->result = fma256(job->count); break;
    case 3: job->result = bf16dot512(job->count); break;
    case 4: job->result = vnni512(job->count); break;
    case 5: job->result = vnni256(job->count); break;
    case 6: job->result = vnni16x512(job->count); break;
    case 7: job->result = amx_int8(job->count); break;
    }
    return NULL;
}

/* Runs `kind` on `threads` pthreads, thread t pinned to cpus[t] (none if cpus[t] < 0); kind 0 reads its slice of
   data[n] `count` times, the others run `count` iterations of their chains. Stores the results' sum in *sink (so no
   compiler drops the work); returns 0, -1 if a thread could not start, -2 if a kernel could not run (NAN). */
int32_t roofline_run(int32_t kind, const float *data, int64_t n, int64_t count, int32_t threads, const int32_t *cpus,
                     double *sink) {
    static job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    if (threads < 1 || threads > MAX_THREADS) return -1;
    int64_t slice = n / threads / 128 * 128;
    for (int t = 0; t < threads; t++) {
        job_t job = {kind, data + t * slice, slice, count, cpus[t], 0};
        jobs[t] = job;
        if (pthread_create(&ids[t], NULL, work, &jobs[t]) != 0) {
            for (int u = 0; u < t; u++) pthread_join(ids[u], NULL);
            return -1;
        }
    }
    double total = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        total += jobs[t].result;
    }
    *sink = total;
    return total != total ? -2 : 0;
}
"""

READ = 0
# Each peak's kernels, best first: (kind in roofline_run, operations per iteration = chains x lanes x multiply-adds
# per lane x 2, the CPU flags it needs, what it runs)
PEAK_KERNELS = {
    "fp32": [(1, 16 * 16 * 1 * 2, {"avx512f", "fma"}, "AVX-512 FMA"), (2, 12 * 8 * 1 * 2, {"avx2", "fma"}, "AVX2 FMA")],
    "bf16": [(3, 16 * 16 * 2 * 2, {"avx512f", "avx512_bf16"}, "AVX512-BF16 vdpbf16ps")],
    "int8": [(4, 16 * 16 * 4 * 2, {"avx512f", "avx512_vnni"}, "AVX-512 VNNI vpdpbusd"),
             (5, 12 * 8 * 4 * 2, {"avx2", "avx_vnni"}, "AVX-VNNI vpdpbusd")],
    "int16": [(6, 16 * 16 * 2 * 2, {"avx512f", "avx512_vnni"}, "AVX-512 VNNI vpdpwssd")],
    "amx_int8": [(7, 4 * 16 * 16 * 64 * 2, {"amx_tile", "amx_int8"}, "AMX tdpbusd")],
}  # fmt: skip
READ_PASS_BYTES = 4 * 128  # a slice is whole 128-float runs


@dataclass(frozen=True)
class MachineRoofline:
    """What this machine reaches: read GB/s and peak G(FL)OP/s by thread count; a peak is None where the CPU lacks
    the instructions, with the reason in `missing`."""

    threads: tuple[int, ...]  # the thread counts measured
    read_gbs: dict[int, float]
    peaks: dict[str, dict[int, float] | None]  # "fp32" / "bf16" / "int8" / "int16" -> threads -> G(FL)OP/s
    kernels: dict[str, str]  # which instruction each peak ran, or why none did
    amx: str  # "" or the AMX flags the CPU shows (not measured)
    array_bytes: int

    def best(self, other: MachineRoofline) -> MachineRoofline:
        """Each number the higher of two runs: on a shared host a neighbour can take a core for seconds, and what the
        hardware reaches is the better figure."""
        peaks = {
            k: None if v is None else {t: max(x, other.peaks[k][t]) for t, x in v.items()}
            for k, v in self.peaks.items()
        }
        read = {t: max(v, other.read_gbs[t]) for t, v in self.read_gbs.items()}
        return MachineRoofline(self.threads, read, peaks, self.kernels, self.amx, self.array_bytes)

    def to_json(self) -> dict:
        return {
            "threads": list(self.threads),
            "read_gbs": {str(t): v for t, v in self.read_gbs.items()},
            "peaks": {k: None if v is None else {str(t): x for t, x in v.items()} for k, v in self.peaks.items()},
            "kernels": self.kernels,
            "amx": self.amx,
            "array_bytes": self.array_bytes,
        }


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order (its affinity mask; a container's cpuset)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def measure_machine(
    thread_counts: tuple[int, ...], array_bytes: int = 1 << 30, repeats: int = 5, seconds: float = 0.3,
    progress: Callable[[str], None] = lambda message: None,
) -> MachineRoofline:  # fmt: skip
    """Read bandwidth and the peaks with each of `thread_counts` threads (1 and all usable CPUs, say); each number
    the best of `repeats` calls that each last about `seconds`."""
    cpus = usable_cpus()
    counts = tuple(sorted(set(thread_counts)))
    lib = _library()
    flags = cpu_flags()
    array = _filled_array(array_bytes)
    read_gbs = {}
    for threads in counts:
        progress(f"read bandwidth, {threads} thread(s), {array.nbytes / 2**30:.2f} GiB array")
        passes, best = _timed(lib, READ, array, threads, cpus, repeats, seconds)
        read_gbs[threads] = _slice_bytes(array, threads) * threads * passes / best / 1e9
    del array
    peaks: dict[str, dict[int, float] | None] = {}
    kernels: dict[str, str] = {}
    for name, options in PEAK_KERNELS.items():
        usable = next((o for o in options if o[2] <= flags), None)
        if usable is None:
            peaks[name], kernels[name] = None, "not available: no " + " or ".join(o[3] for o in options)
            continue
        kind, ops, _, label = usable
        kernels[name], peaks[name] = label, {}
        for threads in counts:
            progress(f"peak {name} ({label}), {threads} thread(s)")
            try:
                iters, best = _timed(lib, kind, None, threads, cpus, repeats, seconds)
            except Unavailable as exc:  # AMX's tiles where Linux will not grant them
                peaks[name], kernels[name] = None, f"not available: {label} {exc}"
                break
            peaks[name][threads] = iters * ops * threads / best / 1e9
    amx = " ".join(sorted(f for f in flags if f.startswith("amx")))
    return MachineRoofline(counts, read_gbs, peaks, kernels, amx, array_bytes)


def _timed(lib, kind: int, array: np.ndarray | None, threads: int, cpus: list[int], repeats: int, seconds: float):
    """(count, best seconds): the count (passes or iterations) grown until one call takes `seconds`, then the best
    of `repeats` calls with it."""
    pinned = (ctypes.c_int32 * threads)(*(cpus[t % len(cpus)] for t in range(threads)))
    data, n = (None, 0) if array is None else (array.ctypes.data, array.size)
    sink = ctypes.c_double()

    def call(count: int) -> float:
        start = time.perf_counter()
        status = lib.roofline_run(kind, data, n, count, threads, pinned, ctypes.byref(sink))
        if status == -2:
            raise Unavailable("refused by the kernel or not built by this compiler")
        if status < 0:
            raise Unavailable(f"roofline kernel: could not start {threads} threads")
        return time.perf_counter() - start

    count = 1 if array is not None else 1 << 16
    while (took := call(count)) < seconds / 4:
        count *= 2
    count = max(1, round(count * seconds / took))
    return count, min(call(count) for _ in range(repeats))


def _slice_bytes(array: np.ndarray, threads: int) -> int:
    """Bytes each thread reads a pass (the C side's slice: whole 128-float runs)."""
    return array.size // threads // 128 * READ_PASS_BYTES


def _filled_array(nbytes: int) -> np.ndarray:
    """A float32 array of `nbytes`, 64-byte aligned, every page written (so it is real memory)."""
    n = max(128, nbytes // 4 // 128 * 128)
    raw = np.empty(n + 16, np.float32)
    offset = (-raw.ctypes.data % 64) // 4
    array = raw[offset : offset + n]
    array.fill(1.0)
    return array


def _library() -> ctypes.CDLL:
    """The C source compiled once per machine into the kernels folder (keyed by its hash), loaded."""
    key = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:16]
    target = kernels_dir() / f"roofline-{key}.so"
    if not target.exists():
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise Unavailable("sagellm bench roofline compiles its kernels with cc: no C compiler on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = target.with_suffix(f".{os.getpid()}.c")
        partial = target.with_suffix(f".{os.getpid()}.so")
        source.write_text(C_SOURCE)
        try:
            command = [compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(partial), str(source)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode:
                error = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
                raise Unavailable(f"{compiler} failed on the roofline kernels: {error}")
            os.replace(partial, target)
        finally:
            source.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(target))
    lib.roofline_run.restype = ctypes.c_int32
    lib.roofline_run.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                                 ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_double)]  # fmt: skip
    return lib
