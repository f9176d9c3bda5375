"""The CPU a benchmark ran on, for every printed result: these machines differ between
sessions, and bfloat16 speed depends on AVX512-BF16 and AMX."""

from __future__ import annotations

import os

CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")  # what sets bfloat16 copy/compute speed


def cpu_name() -> str:
    """The CPU's model name, its CPU count and whether it has ``CPU_FLAGS``, from
    /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
    return f"{name}, {os.cpu_count()} CPUs ({have})"
