"""Which instruction sets the native kernels are built for, and which one this CPU runs: chosen at run time.

Each variant is the same C sources compiled with the flags of one x86 level; the kernels' vector code widens with
what the compiler may use (AVX-512's 512-bit registers and masked loads, AVX2's 256-bit FMA), and their `#if`
paths pick intrinsics by the `__AVX512F__` / `__AVX2__` the flags define. The best variant whose instructions the CPU
has (its /proc/cpuinfo flags) is loaded; `SAGELLM_NATIVE_ISA=avx512` (`avx2`, `portable`) asks for a lower one. Every
variant is built from explicit flags, never `-march=native`, so a library is the same on every machine that builds
it, and a CPU without a variant's instructions never loads it. AMX's tile multiplies are no variant of their own: the
avx512vnni library runs its int8 linears' rows on them where the CPU has AMX-INT8 and the kernel grants the tile state
(asked at run time); `SAGELLM_NATIVE_AMX=0` turns that off."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from sagellm.common.errors import InvalidInput

ISA_ENV = "SAGELLM_NATIVE_ISA"
AMX_ENV = "SAGELLM_NATIVE_AMX"  # "0": the q8 linears leave AMX's tiles for VNNI's vpdpbusd (block_q8_amx.c)


@dataclass(frozen=True)
class Variant:
    name: str
    requires: frozenset[str]  # /proc/cpuinfo flags the CPU must have
    cflags: tuple[str, ...]


AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c")
AVX512_CFLAGS = tuple(f"-m{flag}" for flag in AVX512) + ("-mprefer-vector-width=512",)
X86_VARIANTS = (  # best first
    # Ice Lake and later, Zen 4: VNNI's vpdpbusd does the K-quant decode linears' int8 dot products in one
    # instruction, not two, and VBMI's vpermb regroups Q6_K's bytes for them in one (block_int8.c).
    Variant(
        "avx512vnni",
        frozenset({*AVX512, "avx512_vnni", "avx512vbmi"}),
        (*AVX512_CFLAGS, "-mavx512vnni", "-mavx512vbmi"),
    ),
    Variant("avx512", frozenset(AVX512), AVX512_CFLAGS),
    Variant("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c")),
    Variant("portable", frozenset(), ("-march=x86-64",)),
)
OTHER_VARIANTS = (Variant("portable", frozenset(), ()),)


def variants() -> tuple[Variant, ...]:
    """This architecture's variants, best first (on other machines than x86, the compiler's default only)."""
    return X86_VARIANTS if platform.machine().lower() in ("x86_64", "amd64") else OTHER_VARIANTS


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """The CPU's maker as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"; "" where it does not say)."""
    return _cpuinfo_field("vendor_id")


def _cpuinfo_field(name: str) -> str:
    """The first CPU's `name` line of /proc/cpuinfo, its value ("" where there is none, or no such file)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), "")


def runnable(flags: frozenset[str] | None = None) -> list[Variant]:
    """The variants this CPU can run, best first."""
    flags = cpu_flags() if flags is None else flags
    return [v for v in variants() if v.requires <= flags]


def chosen() -> Variant:
    """The variant to load: the one $SAGELLM_NATIVE_ISA names (if this CPU runs it), else the best it runs."""
    can = runnable()
    asked = os.environ.get(ISA_ENV)
    if not asked:
        return can[0]
    by_name = {v.name: v for v in variants()}
    if asked not in by_name:
        raise InvalidInput(f"{ISA_ENV}={asked}: no such kernel variant; have {', '.join(by_name)}")
    if by_name[asked] not in can:
        missing = sorted(by_name[asked].requires - cpu_flags())
        raise InvalidInput(f"{ISA_ENV}={asked}: this CPU lacks {', '.join(missing)}")
    return by_name[asked]
