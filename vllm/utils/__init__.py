"""Small helpers shared across the engine: ports, integer math, memory, CPU features.

``FlexibleArgumentParser`` lives in ``vllm.utils.argparse_utils`` (as upstream) and is
re-exported here so ``from vllm.utils import FlexibleArgumentParser`` keeps working.
"""

from __future__ import annotations

import functools
import gc
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vllm.utils.argparse_utils import FlexibleArgumentParser

if TYPE_CHECKING:
    import torch

__all__ = [
    "AVX512_FLAGS",
    "NATIVE_GEMM_FLAGS",
    "FlexibleArgumentParser",
    "advise_huge_pages",
    "cdiv",
    "cpu_has_avx512",
    "cpu_lacks_native_gemm",
    "gc_paused",
    "get_open_port",
    "process_memory",
    "tune_cpu_malloc",
]


def get_open_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers."""
    return -(a // -b)


def process_memory() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes (Linux; else (0, 0))."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
    except OSError:
        return 0, 0

    def field(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) * 1024 if match else 0

    return field("VmRSS"), field("VmHWM")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block.

    Code that creates an object or two per module or tensor (building a model, loading
    it, a save's manifest) triggers full collections, each walking every object of the
    process: 0.1-0.2 s apiece once torch, transformers and a model of thousands of
    modules are loaded. Objects made in the block are still freed by reference counting;
    cycles wait for the next collection.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.cache
def _libc() -> Any:
    """glibc through ctypes (None where unavailable); ``find_library`` runs a subprocess,
    so the handle is looked up once."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


# CPU flags (/proc/cpuinfo) that give torch a native GEMM for each 16-bit dtype.
NATIVE_GEMM_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16"),
    "float16": ("avx512_fp16", "amx_fp16"),
}


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where that is not readable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_lacks_native_gemm(dtype: torch.dtype) -> bool:
    """True when this x86 CPU has no native matrix multiply for a 16-bit ``dtype``, so
    torch emulates it (several times slower than float32: ~3x for bfloat16 and ~6x for
    float16 at 32 rows on a 2-core AVX-512 Xeon without AVX512-BF16). False where that
    cannot be told (other dtypes, no /proc/cpuinfo, non-x86 CPUs)."""
    flags = _cpu_flags()
    wanted = NATIVE_GEMM_FLAGS.get(str(dtype).removeprefix("torch."))
    if flags is None or wanted is None or "avx2" not in flags:  # "avx2": an x86 CPU
        return False
    return not any(flag in flags for flag in wanted)


AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")


def cpu_has_avx512() -> bool:
    """Whether the CPU has the AVX-512 subsets vllm._C's AVX-512 kernels use."""
    flags = _cpu_flags()
    return flags is not None and all(f in flags for f in AVX512_FLAGS)


def tune_cpu_malloc() -> bool:
    """Keep freed activation memory in glibc's heap instead of giving it back to the OS.

    A forward pass allocates and frees the same multi-MiB activations every layer. By
    default glibc serves such blocks with fresh ``mmap`` pages and trims the heap when
    they are freed, so each step faults its memory in again (on VMs a page fault costs
    microseconds). This raises the mmap threshold to glibc's maximum (32 MiB) and the
    trim threshold to 1 GiB, as upstream's advice to preload tcmalloc achieves for CPU
    inference. Returns False where glibc's ``mallopt`` is not available.
    """
    libc = _libc() if sys.platform.startswith("linux") else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # no libc, or not glibc (e.g. musl)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 << 20) == 1
    ok &= mallopt(m_trim_threshold, 1 << 30) == 1
    ok &= mallopt(m_top_pad, 64 << 20) == 1
    return bool(ok)


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large CPU tensor with transparent huge pages (``madvise``).

    For the KV cache, which is allocated untouched and faulted in as sequences grow: one
    2 MiB fault replaces 512 small ones (each a VM exit on virtual machines), and the
    attention reads need fewer TLB entries. Only the 2 MiB-aligned part of the tensor is
    advised. Returns False where the advice is unavailable (not Linux, THP disabled by
    the system, no libc) or the tensor holds no whole huge page; the tensor works the
    same either way.
    """
    import ctypes
    import mmap

    madv_hugepage = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if madv_hugepage is None or not t.is_cpu or t.is_mkldnn:
        return False
    huge = 2 << 20
    start = -(-t.data_ptr() // huge) * huge
    end = (t.data_ptr() + t.numel() * t.element_size()) // huge * huge
    libc = _libc() if end > start else None
    if libc is None:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), madv_hugepage) == 0
