"""8-bit weight formats against float32 references: what quantization keeps of a weight
and what the tiled matmul computes from it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vllm import _custom_ops as ops
from vllm.model_executor.layers.quantization.weight8 import (
    Weight8Format,
    codes_to_float,
    dequantize,
    num_groups,
    quantize,
    weight8_linear,
)

FP8 = Weight8Format(torch.float8_e4m3fn, group_size=None)
INT8 = Weight8Format(torch.int8, group_size=None)
FP8_GROUPS = Weight8Format(torch.float8_e4m3fn, group_size=32)
FORMATS = {"fp8": FP8, "int8": INT8, "fp8-groups": FP8_GROUPS}


def test_every_fp8_code_converts_exactly() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    expected = codes.float()  # torch's own (slow, element-wise) conversion
    finite = ~expected.isnan()
    assert torch.equal(codes_to_float(codes)[finite], expected[finite])


@pytest.mark.parametrize("name", FORMATS)
def test_quantization_error_is_within_half_a_code_step(name: str) -> None:
    """int8 rounds to the nearest multiple of the scale: error <= scale / 2. E4M3 keeps 3
    mantissa bits: error <= 2^-4 of the value for normal numbers, and <= half the
    smallest subnormal step (2^-10 of the scale) below 2^-6."""
    fmt = FORMATS[name]
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 96)  # columns of very different sizes
    codes, scale = quantize(w, fmt)
    assert codes.dtype == fmt.code_dtype and codes.shape == w.shape
    groups = 96 // fmt.group_size if fmt.group_size else 1
    assert scale.shape == (48, groups) and scale.dtype == torch.float32
    back = dequantize(codes, scale, torch.float32)
    per_elem_scale = scale.repeat_interleave(96 // groups, dim=1)
    err = (back - w).abs()
    if fmt.code_dtype == torch.int8:
        assert (err <= per_elem_scale / 2 * (1 + 1e-6)).all()
    else:
        q = w.abs() / per_elem_scale  # the value in code units
        bound = torch.where(q >= 2**-6, q * 2**-4, torch.full_like(q, 2**-10)) * per_elem_scale
        assert (err <= bound * (1 + 1e-6)).all()
    # The largest magnitude of each group maps to the largest code: no code overflows.
    assert codes_to_float(codes).abs().amax() == fmt.max_code


def test_all_zero_rows_quantize_to_zero() -> None:
    w = torch.zeros(4, 64)
    w[1] = 1.0
    codes, scale = quantize(w, FP8)
    assert torch.equal(dequantize(codes, scale, torch.float32), w)


def test_given_amax_sets_the_scale() -> None:
    """A row-parallel rank scales by the whole row's largest magnitude, not its part's."""
    w = torch.full((2, 8), 0.5)
    codes, scale = quantize(w, INT8, amax=torch.tensor([[2.0], [4.0]]))
    assert torch.allclose(scale[:, 0], torch.tensor([2.0, 4.0]) / 127)
    assert torch.allclose(dequantize(codes, scale, torch.float32), w, atol=4.0 / 127 / 2)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_tiled_linear_matches_dequantize_then_matmul(name, dtype, rows) -> None:
    """Against float32 math on the dequantized weight. float32: only the order of the
    sums differs. bfloat16: the input and the dequantized weight are rounded to bfloat16
    (2^-8 relative each) and so is each output; the bound allows a few such roundings
    of the largest term."""
    fmt = FORMATS[name]
    torch.manual_seed(1)
    n, k = 1000, 160  # more rows than one tile holds: the tiles must line up
    codes, scale = quantize(torch.randn(n, k) * 0.05, fmt)
    bias = torch.randn(n) * 0.1
    x = torch.randn(rows, k)
    reference = F.linear(x, dequantize(codes, scale, torch.float32), bias)
    out = weight8_linear(x.to(dtype), codes, scale, bias.to(dtype))
    assert out.dtype == dtype and out.shape == (rows, n)
    magnitude = (x.abs() @ dequantize(codes, scale, torch.float32).abs().T).amax()
    tol = 1e-5 * magnitude if dtype == torch.float32 else 4 * 2**-8 * magnitude
    assert (out.float() - reference).abs().max() <= tol


def test_groups_are_equal_and_never_longer_than_group_size() -> None:
    fmt = Weight8Format(torch.float8_e4m3fn, group_size=512)
    assert num_groups(fmt, 512) == 1 and num_groups(fmt, 100) == 1  # one group per row
    assert num_groups(fmt, 2048) == 4
    assert num_groups(fmt, 576) == 2  # SmolLM2's hidden size: two groups of 288
    assert num_groups(fmt, 513) == 3  # groups of 171
    with pytest.raises(ValueError, match="521 input columns .* only as groups of 1;"):
        num_groups(fmt, 521)  # a prime


@pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="vllm._C is not built")
@pytest.mark.parametrize("avx2", ["1", "0"])
def test_kernel_paths_match_the_reference(avx2: str) -> None:
    """The C kernel's AVX2 and portable paths (the latter forced by VLLM_CPU_W8_AVX2=0,
    read once per process, hence the subprocess), odd sizes and a K tail included."""
    code = """
import torch, torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm.model_executor.layers.quantization.weight8 import Weight8Format, quantize, dequantize
torch.manual_seed(0)
for dtype, group, k in [(torch.float8_e4m3fn, None, 37), (torch.int8, None, 64),
                        (torch.float8_e4m3fn, 20, 100)]:
    codes, scale = quantize(torch.randn(19, k), Weight8Format(dtype, group))
    for rows in (1, 3, 6):
        x = torch.randn(rows, k)
        ref = F.linear(x, dequantize(codes, scale, torch.float32))
        out = ops.w8_linear(x, codes, scale)
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max(), (dtype, group, rows)
print("ok")
"""
    env = {**os.environ, "VLLM_CPU_W8_AVX2": avx2}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
