"""Automatic prefix caching on a shared-prefix workload: on against off, in one run.

Every request is one shared system prompt followed by its own question, generating
a fixed number of tokens (greedy, EOS ignored). The same requests run on a fresh
``LLM(enable_prefix_caching=False)`` and a fresh ``LLM(enable_prefix_caching=True)``
(one at a time: the first is deleted before the second is built), and the table shows
the seconds each took, the prompt tokens each actually computed (prompt length minus
``RequestOutput.num_cached_tokens``, summed over requests), the on/off ratios, and
whether the two produced identical greedy tokens. The model is built locally (nothing
is downloaded): the random ~100M-parameter Llama of benchmark_throughput.py by default.

    python benchmarks/benchmark_prefix_caching.py               # 64 x (1000 shared + 50) tokens
    python benchmarks/benchmark_prefix_caching.py --prime       # system prompt cached beforehand
    python benchmarks/benchmark_prefix_caching.py --repeats 3   # medians, alternating the order
    python benchmarks/benchmark_prefix_caching.py --model DIR   # an existing HF checkpoint
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from benchmark_throughput import build_default_model


@dataclass
class Workload:
    prompts: list[list[int]]
    system: list[int]
    max_tokens: int


@dataclass
class Run:
    seconds: float
    computed: int  # prompt tokens prefilled, not found in the cache
    outputs: list[list[int]]


@dataclass
class Mode:
    name: str
    enable_prefix_caching: bool
    runs: list[Run] = field(default_factory=list)

    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def median_computed(self) -> float:
        return statistics.median(r.computed for r in self.runs)


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    system = tokens(args.prefix_len)
    prompts = [system + tokens(args.question_len) for _ in range(args.num_requests)]
    return Workload(prompts, system, args.output_len)


def run_mode(args: argparse.Namespace, mode: Mode, workload: Workload) -> Run:
    """Build a fresh LLM for ``mode``, time the workload once, then free the LLM."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enable_prefix_caching=mode.enable_prefix_caching,
        max_num_seqs=max(256, len(workload.prompts)),
    )
    greedy = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
    warm = [[5, 6, 7, 8]]  # shares no block with the workload
    llm.generate([{"prompt_token_ids": p} for p in warm], greedy, use_tqdm=False)
    if args.prime:
        llm.generate([{"prompt_token_ids": workload.system}], greedy, use_tqdm=False)
    requests = [{"prompt_token_ids": p} for p in workload.prompts]
    start = time.perf_counter()
    outputs = llm.generate(requests, greedy, use_tqdm=False)
    seconds = time.perf_counter() - start
    computed = sum(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) for o in outputs)
    run = Run(seconds, computed, [list(o.outputs[0].token_ids) for o in outputs])
    del llm, outputs
    gc.collect()
    return run


def identical(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def print_table(args: argparse.Namespace, off: Mode, on: Mode, workload: Workload) -> None:
    n_prompt = sum(len(p) for p in workload.prompts)
    n_out = len(workload.prompts) * workload.max_tokens
    print(
        f"\n{len(workload.prompts)} requests: {args.prefix_len} shared + {args.question_len} "
        f"own prompt tokens each ({n_prompt} in all), {workload.max_tokens} new tokens each, "
        f"greedy, dtype={args.dtype}, system prompt cached beforehand: "
        f"{'yes' if args.prime else 'no'}; medians of {args.repeats} run(s)"
    )
    print(f"{'prefix caching':<16}{'seconds':>9}{'prefill computed':>18}{'cached':>9}{'tok/s':>9}")
    for mode in (off, on):
        sec, computed = mode.median_seconds(), mode.median_computed()
        print(
            f"{mode.name:<16}{sec:>9.2f}{computed:>18.0f}{n_prompt - computed:>9.0f}"
            f"{(n_prompt + n_out) / sec:>9.1f}"
        )
    speedup = off.median_seconds() / on.median_seconds()
    work = on.median_computed() / off.median_computed()
    print(f"on/off: {speedup:.2f}x faster, {work:.3f}x the prefill tokens computed")
    same = [identical(a.outputs, b.outputs) for a, b in zip(off.runs, on.runs)]
    print(
        "greedy outputs identical on and off: "
        + ", ".join(f"{s}/{len(workload.prompts)}" for s in same)
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF model directory; a random ~100M Llama is built there if it holds no "
        "config.json (default: a temp dir)",
    )
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1000, help="shared system prompt")
    parser.add_argument("--question-len", type=int, default=50, help="each request's own part")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prime",
        action="store_true",
        help="run the system prompt alone first (untimed), as a server that has seen it",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="build and time each mode this many times, alternating which goes first",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as tmp:
        args.model = build_default_model(args.model or os.path.join(tmp, "llama-100m"))
        workload = make_workload(args, AutoConfig.from_pretrained(args.model).vocab_size)
        off, on = Mode("off", False), Mode("on", True)
        for repeat in range(args.repeats):
            for mode in (off, on) if repeat % 2 == 0 else (on, off):
                mode.runs.append(run_mode(args, mode, workload))
    print_table(args, off, on, workload)


if __name__ == "__main__":
    main()
