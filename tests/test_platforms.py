"""vllm.platforms.current_platform answers what upstream's tests ask, from torch."""

from __future__ import annotations

import torch

from vllm.platforms import current_platform


def test_current_platform_matches_torch() -> None:
    import vllm.platforms

    assert vllm.platforms.current_platform is current_platform  # detected once
    if torch.cuda.is_available():
        assert current_platform.is_cuda_alike() and not current_platform.is_cpu()
        assert current_platform.device_type == "cuda"
        assert current_platform.dispatch_key == "CUDA"
        assert current_platform.device_count() == torch.cuda.device_count()
        assert current_platform.is_rocm() == bool(torch.version.hip)
    else:
        assert current_platform.is_cpu()
        assert not (current_platform.is_cuda() or current_platform.is_rocm())
        assert (current_platform.device_type, current_platform.device_name) == ("cpu", "cpu")
        assert current_platform.dispatch_key == "CPU"
        assert current_platform.device_count() == 0
    assert torch.empty(1, device=current_platform.device_type).device.type == (
        current_platform.device_type
    )
