"""Which bf16 instruction set this CPU has: "amx_bf16", "avx512_bf16" or None (no torch, no OpenVINO).

bf16 verdicts (manifest models[i].bf16.isa) are per ISA: OpenVINO's CPU plugin picks different
kernels and fusions on AMX than on AVX512-BF16 alone, so a verdict measured on one does not cover the
other (issue 19: NaN on AMX where AVX512-BF16 was fine).
"""

from __future__ import annotations

from pathlib import Path

BF16_ISAS = ("amx_bf16", "avx512_bf16")  # best first: an AMX CPU also has AVX512_BF16, and runs AMX kernels


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")),
                    []))


def bf16_isa(flags: set[str] | None = None) -> str | None:
    """The bf16 ISA OpenVINO's kernels use here (AMX where present), or None (none, or it cannot be told)."""
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa in BF16_ISAS if isa in flags), None)
