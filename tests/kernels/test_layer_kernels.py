"""The C layer kernels (RMSNorm, SiLU-and-mul, rotary, KV-cache write) against the torch
paths of the layers that call them."""

from __future__ import annotations

import pytest
import torch

from vllm import _custom_ops as ops
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

pytestmark = pytest.mark.skipif(ops._C is None, reason="vllm._C was not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _close(dtype):
    """Tolerance for one result: a different float32 summation order may flip one
    rounding of a 16-bit value (1 ulp)."""
    if dtype == torch.float32:
        return {}
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-5}


class _CountingC:
    """Stands in for vllm._C and counts the kernel calls that go through it."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __getattr__(self, name):
        def call(*args):
            self.calls += 1
            return getattr(self.module, name)(*args)

        return call


def _both_paths(monkeypatch, fn):
    """fn() run on the torch path, then through the C kernels (inputs cloned by fn)."""
    counting = _CountingC(ops._C)
    monkeypatch.setattr(ops, "_C", counting)
    monkeypatch.setattr(ops, "HAS_CPU_KERNELS", False)
    ref = fn()
    assert counting.calls == 0
    monkeypatch.setattr(ops, "HAS_CPU_KERNELS", True)
    out = fn()
    assert counting.calls == 1, "the layer did not take its C kernel"
    return ref, out


# 100 is not a multiple of 8 (vector tail); 300 x 4096 takes the multi-threaded path.
@pytest.mark.parametrize("rows,hidden", [(5, 768), (3, 100), (300, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(monkeypatch, rows, hidden, dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden, eps=1e-5, params_dtype=dtype)
    norm.weight.data.copy_(torch.rand(hidden, generator=gen) + 0.5)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    res = torch.randn(rows, hidden, generator=gen).to(dtype)

    ref, out = _both_paths(monkeypatch, lambda: norm(x.clone()))
    torch.testing.assert_close(out, ref, **_close(dtype))

    (ref, ref_sum), (out, out_sum) = _both_paths(monkeypatch, lambda: norm(x.clone(), res.clone()))
    torch.testing.assert_close(out_sum, ref_sum, rtol=0, atol=0)  # one rounded add: exact
    torch.testing.assert_close(out, ref, **_close(dtype))


def test_fused_add_rms_norm_works_in_place():
    # Upstream's contract: input becomes the output and residual the sum.
    x, res, w = torch.randn(4, 64), torch.randn(4, 64), torch.rand(64)
    expected_sum = x + res
    x_in, res_in = x.clone(), res.clone()
    ops.fused_add_rms_norm(x_in, res_in, w, 1e-6)
    torch.testing.assert_close(res_in, expected_sum)
    h = expected_sum * torch.rsqrt(expected_sum.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(x_in, w * h)


@pytest.mark.parametrize("rows,d", [(3, 2048), (2, 13), (300, 1024)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(monkeypatch, rows, d, dtype):
    gen = torch.Generator().manual_seed(1)
    # Gate values far into both tails (exp over- and underflow) and around zero.
    x = (torch.randn(rows, 2 * d, generator=gen) * 8).to(dtype)
    x[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    ref, out = _both_paths(monkeypatch, lambda: SiluAndMul()(x))
    torch.testing.assert_close(out, ref, **_close(dtype))


def test_silu_and_mul_takes_strided_rows():
    wide = torch.randn(6, 100)
    x = wide[:, 10:50]  # row stride 100, last dim packed
    out = torch.empty(6, 20)
    ops.silu_and_mul(out, x)
    torch.testing.assert_close(out, torch.nn.functional.silu(x[:, :20]) * x[:, 20:])


def _rope(head_size, rotary_dim, max_pos=300):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    return RotaryEmbedding(head_size, rotary_dim, max_pos, inv_freq)


# Full and partial rotary (GPT-NeoX), GQA and MHA.
# 300 tokens x 16 heads x 64 takes the multi-threaded path.
@pytest.mark.parametrize(
    "heads,kv_heads,head_size,rotary_dim,tokens",
    [(12, 4, 64, 64, 7), (4, 4, 32, 8, 7), (2, 1, 80, 40, 7), (12, 4, 64, 64, 300)],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_torch(monkeypatch, heads, kv_heads, head_size, rotary_dim, tokens, dtype):
    gen = torch.Generator().manual_seed(2)
    rope = _rope(head_size, rotary_dim)
    q_size, kv_size = heads * head_size, kv_heads * head_size
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    positions = torch.randint(0, 300, (tokens,), generator=gen)
    positions[:2] = torch.tensor([0, 299])
    v_before = qkv[:, q_size + kv_size :].clone()

    def run():
        run.qkv = qkv.clone()
        q, k, _ = run.qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided views
        return rope(positions, q, k)

    (rq, rk), (q, k) = _both_paths(monkeypatch, run)
    assert torch.equal(run.qkv[:, q_size + kv_size :], v_before)  # in place on q, k only
    torch.testing.assert_close(q, rq, **_close(dtype))
    torch.testing.assert_close(k, rk, **_close(dtype))


def test_rotary_rejects_positions_outside_the_table():
    rope = _rope(64, 64, max_pos=16)
    q, k = torch.randn(2, 128), torch.randn(2, 64)
    with pytest.raises(ValueError, match="position 16 of token 1"):
        ops.rotary_embedding(torch.tensor([3, 16]), q, k, 64, rope.cos_sin_cache)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_writes_slots(dtype):
    kv_heads, head_size = 4, 16
    qkv = torch.randn(5, (4 + 2 * kv_heads) * head_size).to(dtype)
    k = qkv[:, 64:128].view(5, kv_heads, head_size)
    v = qkv[:, 128:].view(5, kv_heads, head_size)
    slots = torch.tensor([7, 0, 31, 8, 20])
    k_cache = torch.zeros(32, kv_heads, head_size, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref_k.index_copy_(0, slots, k)
    ref_v.index_copy_(0, slots, v)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_reshape_and_cache_rejects_slots_outside_the_cache():
    k = torch.randn(2, 1, 8)
    k_cache = torch.zeros(4, 1, 8)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="slot 4 of token 1"):
        ops.reshape_and_cache(k, k, k_cache, k_cache.clone(), torch.tensor([0, 4]))
    assert torch.equal(k_cache, before)  # checked before anything is written


def test_kernels_reject_what_they_cannot_take():
    with pytest.raises(ValueError, match="silu_and_mul"):
        ops.silu_and_mul(torch.empty(2, 3), torch.randn(2, 8))  # out should be [2, 4]
    with pytest.raises(ValueError, match="rms_norm: weight"):
        ops.rms_norm(torch.empty(2, 8), torch.randn(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="needs a CPU tensor"):
        ops.silu_and_mul(torch.empty(2, 4, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32))


@pytest.mark.parametrize("vocab", [32000, 50257, 5])
def test_argmax_logsumexp_matches_torch(vocab):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(40, vocab + 3, generator=gen) * 10
    logits = wide[:, :vocab]  # strided rows
    logits[1, vocab // 2] = logits[1, vocab - 1] = 1e4  # a tie: the first index wins
    logits[2] = -float("inf")
    logits[2, vocab - 1] = 0.0
    ids, maxes, log_sums = ops.argmax_logsumexp(logits)
    assert torch.equal(ids, logits.argmax(dim=-1))
    assert torch.equal(ops.argmax(logits), ids)  # the argmax alone, no exp pass
    torch.testing.assert_close(maxes + log_sums, logits.logsumexp(dim=-1))


def test_argmax_logsumexp_keeps_logprobs_precise_at_large_logits():
    # (x - m) - log_sum: a peaked row with logits near 1e4 still gives the top token's
    # log-probability to float32 precision, not to the rounding of m + log_sum (~5e-4).
    logits = torch.full((1, 1000), 1e4)
    logits[0, 1:] -= torch.linspace(5.0, 20.0, 999)
    ids, maxes, log_sums = ops.argmax_logsumexp(logits)
    got = (logits[0, ids] - maxes) - log_sums
    expected = logits.double().log_softmax(-1)[0, 0]
    assert abs(got.item() - expected.item()) < 1e-6


def test_argmax_logsumexp_edge_rows():
    logits = torch.zeros(3, 20)
    logits[0, 7] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    logits[0, 9] = float("nan")
    logits[1] = -float("inf")  # nothing can be sampled
    ids, maxes, log_sums = ops.argmax_logsumexp(logits)
    lse = maxes + log_sums
    assert ids.tolist() == logits.argmax(dim=-1).tolist() == [7, 0, 0]
    assert ops.argmax(logits).tolist() == [7, 0, 0]
    assert lse[0].isnan() and lse[1] == -float("inf")
    torch.testing.assert_close(lse[2], torch.tensor(20.0).log())
