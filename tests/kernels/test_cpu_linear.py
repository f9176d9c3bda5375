"""Linear layers on the CPU: oneDNN-packed 16-bit weights give torch's own results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm.model_executor.layers.cpu_linear import linear, onednn_packing_enabled, packed_copy

needs_native_bf16 = pytest.mark.skipif(
    not onednn_packing_enabled(torch.bfloat16, "cpu"),
    reason="this CPU does not multiply bfloat16 natively (AVX512-BF16 / AMX)",
)


@needs_native_bf16
@pytest.mark.parametrize("rows", [1, 5, 32, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_bf16_matches_torch(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    w = torch.randn(160, 96, generator=g).bfloat16()
    b = torch.randn(160, generator=g).bfloat16() if bias else None
    out = linear(x, packed_copy(w), b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=0)


@needs_native_bf16
def test_packed_bf16_keeps_leading_dims() -> None:
    x = torch.randn(2, 3, 64).bfloat16()
    w = torch.randn(48, 64).bfloat16()
    assert linear(x, packed_copy(w)).shape == (2, 3, 48)


def test_packing_off_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_ONEDNN_LINEAR", "0")
    assert not onednn_packing_enabled(torch.bfloat16, "cpu")
    assert not onednn_packing_enabled(torch.float32, "cpu")
