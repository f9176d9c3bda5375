"""``from vllm.platforms import current_platform``, as upstream vLLM.

The platform is detected on first use, not at import, so importing this package starts
nothing (no CUDA probe) until a caller asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.platforms.interface import (
    CpuPlatform,
    CudaPlatform,
    Platform,
    PlatformEnum,
    RocmPlatform,
    detect_platform,
)

if TYPE_CHECKING:
    current_platform: Platform

__all__ = [
    "CpuPlatform",
    "CudaPlatform",
    "Platform",
    "PlatformEnum",
    "RocmPlatform",
    "current_platform",
]

_current: Platform | None = None


def __getattr__(name: str) -> Platform:
    global _current
    if name == "current_platform":
        if _current is None:
            _current = detect_platform()
        return _current
    raise AttributeError(f"module 'vllm.platforms' has no attribute {name!r}")
