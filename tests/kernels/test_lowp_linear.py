"""The 16-bit-weight linear kernel (csrc/cpu/gemm.c) against torch's GEMM in float32, and
the dispatch of the linear layers to it on CPUs without native 16-bit GEMMs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vllm import _custom_ops as ops
from vllm.model_executor.layers import cpu_linear
from vllm.model_executor.layers.linear import ReplicatedLinear

pytestmark = pytest.mark.skipif(ops._C is None, reason="vllm._C was not built")

# (M, N, K): row tails of the 8- and 4-row tiles, column tails of the 3- and 2-column
# tiles, k tails of the 32- and 16-value blocks (K=37, 100), K below one block (K=7), and
# a decode-sized layer.
SHAPES = [(1, 1, 7), (1, 7, 37), (5, 11, 64), (9, 13, 100), (33, 770, 96), (32, 256, 768)]


def _case(m, n, k, dtype, bias, strided):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k + 5 if strided else k, generator=g).to(dtype)[:, :k]
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _check_against_float32(out, x, w, b):
    """Each output is the float32 sum rounded once: within one rounding (1 ulp) of the
    float32 result rounded to the dtype, and equal to it almost everywhere (only a
    different order of the float32 sums can flip a rounding)."""
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    assert out.dtype == x.dtype and out.shape == ref.shape
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=1e-6)
    assert (out == ref).float().mean().item() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_lowp_linear_matches_float32(dtype, m, n, k, bias):
    x, w, b = _case(m, n, k, dtype, bias, strided=(m + n) % 2 == 0)
    _check_against_float32(ops.lowp_linear(x, w, b), x, w, b)


def test_lowp_linear_takes_overlapping_rows():
    # An expanded input (row stride 0) and a single row of any stride.
    w = torch.randn(16, 64).bfloat16()
    b = torch.randn(16).bfloat16()
    for x in (torch.randn(1, 64).bfloat16().expand(4, 64), torch.randn(64, 1).bfloat16().t()):
        _check_against_float32(ops.lowp_linear(x, w, b), x, w, b)


def test_portable_path_matches_float32():
    # VLLM_CPU_GEMM_AVX512=0 takes the portable (AVX2 or baseline) micro-kernel that CPUs
    # without AVX-512 run; it is read once per process, hence the subprocess.
    code = (
        "import torch, tests.kernels.test_lowp_linear as t\n"
        "for dtype in (torch.bfloat16, torch.float16):\n"
        "    for m, n, k in t.SHAPES:\n"
        "        for bias in (False, True):\n"
        "            x, w, b = t._case(m, n, k, dtype, bias, strided=True)\n"
        "            t._check_against_float32(t.ops.lowp_linear(x, w, b), x, w, b)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VLLM_CPU_GEMM_AVX512="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_lowp_linear_rejects_mismatched_weight():
    x = torch.randn(2, 8).bfloat16()
    with pytest.raises(ValueError, match="lowp_linear: weight must be torch.bfloat16"):
        ops.lowp_linear(x, torch.randn(4, 8).half())
    with pytest.raises(ValueError, match=r"lowp_linear: weight must be .* \[N, 8\]"):
        ops.lowp_linear(x, torch.randn(4, 9).bfloat16())
    with pytest.raises(ValueError, match=r"lowp_linear: weight must be .* got .* \[8\]"):
        ops.lowp_linear(x, torch.randn(8).bfloat16())
    with pytest.raises(ValueError, match="lowp_linear: bias must be a contiguous"):
        ops.lowp_linear(x, torch.randn(4, 8).bfloat16(), torch.randn(5).bfloat16())
    with pytest.raises(ValueError, match="lowp_linear: needs a bfloat16 or float16"):
        ops.lowp_linear(x.float(), torch.randn(4, 8))


def test_lowp_linear_propagates_nan_and_inf():
    # A NaN or infinity in a row of x reaches every output of that row, as in torch.
    x = torch.randn(9, 64).bfloat16()
    x[2, 5], x[7, 0] = float("nan"), float("inf")
    w = torch.randn(40, 64).bfloat16()
    out = ops.lowp_linear(x, w).float()
    assert out[2].isnan().all() and not out[7].isfinite().any()
    ok = [i for i in range(9) if i not in (2, 7)]
    assert out[ok].isfinite().all()


class _CountingC:
    def __init__(self, module):
        self.module, self.calls = module, 0

    def __getattr__(self, name):
        def call(*args):
            self.calls += name == "lowp_linear"
            return getattr(self.module, name)(*args)

        return call


@pytest.mark.parametrize(
    "rows,takes_kernel,chunk",
    [
        (5, True, None),
        (cpu_linear.LOWP_WIDEN_MIN_ROWS, False, None),
        (cpu_linear.LOWP_WIDEN_MIN_ROWS, False, 7 * 96),  # widened 7 features at a time
    ],
)
def test_linear_layers_take_the_kernel_where_torch_emulates(monkeypatch, rows, takes_kernel, chunk):
    # On such a CPU, few rows go through the kernel and many through torch's float32 GEMM
    # on a widened weight (in blocks of output features for large weights); all give the
    # float32 result rounded once, with the bias.
    monkeypatch.setattr(cpu_linear, "_lowp_dtype", lambda dt: dt == torch.bfloat16)
    if chunk is not None:
        monkeypatch.setattr(cpu_linear, "LOWP_WIDEN_CHUNK", chunk)
    counting = _CountingC(ops._C)
    monkeypatch.setattr(ops, "_C", counting)
    layer = ReplicatedLinear(96, 40, bias=True, params_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 96, generator=g) / 10)
        layer.bias.copy_(torch.randn(40, generator=g))
    x = torch.randn(1, rows, 96, generator=g).bfloat16()
    out = layer(x)
    assert out.shape == (1, rows, 40)
    assert counting.calls == int(takes_kernel)
    _check_against_float32(out[0], x[0], layer.weight, layer.bias)


def test_linear_leaves_weights_without_contiguous_rows_to_torch(monkeypatch):
    # The kernel reads whole weight rows; a transposed view goes to F.linear instead of
    # failing the kernel's check.
    monkeypatch.setattr(cpu_linear, "_lowp_dtype", lambda dt: dt == torch.bfloat16)
    w = torch.randn(64, 16).bfloat16().t()
    x = torch.randn(3, 64).bfloat16()
    torch.testing.assert_close(cpu_linear.linear(x, w), F.linear(x, w))
