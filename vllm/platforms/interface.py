"""What upstream's ``current_platform`` tells scripts and tests about the device they run on.

Only the questions this engine can answer from torch are here: which kind of device, its
names, and how many there are. Kernel and backend choices stay where they are made.
"""

from __future__ import annotations

import enum

import torch


class PlatformEnum(enum.Enum):
    CUDA = enum.auto()
    ROCM = enum.auto()
    CPU = enum.auto()


class Platform:
    """A device family, as upstream vLLM's ``vllm.platforms.interface.Platform``."""

    _enum: PlatformEnum
    device_name: str
    device_type: str
    dispatch_key: str
    # torch.distributed backend the ranks of this platform talk over.
    dist_backend: str

    def is_cuda(self) -> bool:
        return self._enum == PlatformEnum.CUDA

    def is_rocm(self) -> bool:
        return self._enum == PlatformEnum.ROCM

    def is_cuda_alike(self) -> bool:
        """CUDA or ROCm: both are driven through ``torch.cuda``."""
        return self._enum in (PlatformEnum.CUDA, PlatformEnum.ROCM)

    def is_cpu(self) -> bool:
        return self._enum == PlatformEnum.CPU

    def is_xpu(self) -> bool:
        return False

    def is_tpu(self) -> bool:
        return False

    def is_out_of_tree(self) -> bool:
        return False

    @classmethod
    def device_count(cls) -> int:
        """Accelerators visible to this process (0 on the CPU platform)."""
        return 0

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return cls.device_name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device_type={self.device_type!r})"


class CpuPlatform(Platform):
    _enum = PlatformEnum.CPU
    device_name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"
    dist_backend = "gloo"


class CudaPlatform(Platform):
    _enum = PlatformEnum.CUDA
    device_name = "cuda"
    device_type = "cuda"
    dispatch_key = "CUDA"
    dist_backend = "nccl"

    @classmethod
    def device_count(cls) -> int:
        return torch.cuda.device_count()

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        """The GPU's marketing name, e.g. 'NVIDIA H100 80GB HBM3'."""
        return torch.cuda.get_device_name(device_id)


class RocmPlatform(CudaPlatform):
    # ROCm builds of torch drive AMD GPUs through torch.cuda, with upstream's names.
    _enum = PlatformEnum.ROCM
    device_name = "rocm"


def detect_platform() -> Platform:
    """The platform of this process: a GPU torch can use, else the CPU."""
    if torch.cuda.is_available():
        return RocmPlatform() if torch.version.hip else CudaPlatform()
    return CpuPlatform()
