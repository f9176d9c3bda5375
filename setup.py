"""Builds the optional C extension ``vllm._C`` (CPU kernels in csrc/).

Project metadata lives in pyproject.toml. The extension needs only a C compiler and
Python's headers, not torch; if it cannot be built the install still succeeds and the
engine uses its pure-torch paths (``vllm._custom_ops.HAS_CPU_KERNELS`` says which).
"""

import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vllm._C",
            sources=sorted(glob.glob("csrc/cpu/*.c")),
            depends=glob.glob("csrc/cpu/*.h"),
            # -fopenmp links libgomp.so.1: at run time that resolves to the OpenMP
            # runtime torch has loaded, so the kernel runs on torch's thread pool.
            extra_compile_args=["-O3", "-std=gnu11", "-fopenmp", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
