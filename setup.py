"""Builds the optional C extension ``vllm._C`` (CPU kernels in csrc/).

Project metadata lives in pyproject.toml. The extension needs only a C compiler and
Python's headers, not torch; if it cannot be built the install still succeeds and the
engine uses its pure-torch paths (``vllm._custom_ops.HAS_CPU_KERNELS`` says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vllm._C",
            sources=["csrc/cpu/paged_attention.c"],
            # -fopenmp-simd: honour `omp simd` vectorisation hints; no OpenMP runtime.
            extra_compile_args=["-O3", "-std=gnu11", "-fopenmp-simd", "-Wno-psabi"],
            optional=True,
        )
    ]
)
