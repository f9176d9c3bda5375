"""Offline generation throughput: this engine vs transformers ``generate``, in one run.

Both run the same random-weight model on the same prompts, greedy, EOS ignored. The
model is built locally (nothing is downloaded): a ~100M-parameter Llama by default.

Two workloads:
- fixed: every prompt generates --output-len tokens (identical work on both sides);
- mixed: prompt i generates its own length in [--output-len-min, --output-len]; a
  transformers batch runs until its longest request is done (how `generate` batches),
  while continuous batching retires each request at its own length.
Throughput counts only the tokens each request asked for.

    python benchmarks/benchmark_throughput.py                # 32 prompts, up to 128 new tokens
    python benchmarks/benchmark_throughput.py --repeats 3    # medians of 3 interleaved runs
    python benchmarks/benchmark_throughput.py --model DIR    # an existing HF checkpoint

--matrix times batch sizes x prompt lengths x dtypes on this engine, transformers and
optionally upstream vLLM (--peer-python) on the real SmolLM2-135M (throughput_matrix.py):

    python benchmarks/benchmark_throughput.py --matrix --batch-sizes 1,8 \\
        --peer-python /work/peer-venv/bin/python
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import tempfile
import time

import torch
from throughput_matrix import add_matrix_args, run_matrix


def build_default_model(path: str) -> str:
    from vllm.testing import LLAMA_100M, make_model

    if not os.path.isfile(os.path.join(path, "config.json")):
        make_model("llama", path, vocab_size=32000, init_std=0.02, **LLAMA_100M)
    return path


def make_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(2, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)
    ]


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_vllm(llm, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, list]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outputs]


def run_hf(model, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, list]:
    # Left-pad into one batch, as a transformers user batches generate().
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    model.generation_config.eos_token_id = None  # like ignore_eos
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=max(out_lens)
        )
        elapsed = time.perf_counter() - start
    return elapsed, [row[width : width + n] for row, n in zip(out.tolist(), out_lens)]


def linear_floors(model, n_prompt_tokens: int, workloads: dict[str, list[int]]) -> dict:
    """Seconds the model's linear layers alone take for each workload on this machine.

    The work every engine must do: one prefill over all prompt tokens (the LM head only
    for each prompt's last one), then one step per further token over the requests still
    running. Each layer is timed as one matrix multiply per step through this engine's
    ``linear``, the fastest of a few runs on the plain and (float32) oneDNN-packed
    weights; for 16-bit weights on a CPU without native 16-bit GEMMs ``linear`` takes
    ``lowp_linear`` or a widened float32 copy. transformers' time divided by this bounds
    the ratio any engine could reach here, before attention, norms and sampling.
    """
    from vllm.model_executor.layers.cpu_linear import linear, onednn_packing_enabled

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    is_head = [m is head for m in linears]
    plain = [m.weight.detach() for m in linears]
    packs = [plain]
    if onednn_packing_enabled(plain[0].dtype, "cpu"):
        packs.append([torch.ops.mkldnn._reorder_linear_weight(w) for w in plain])

    def step_seconds(rows: int, head_rows: int, repeats: int = 3) -> float:
        xs = [
            torch.randn(head_rows if h else rows, w.shape[1], dtype=w.dtype)
            for w, h in zip(plain, is_head)
        ]
        best = float("inf")
        for weights in packs:
            for _ in range(repeats):
                start = time.perf_counter()
                for x, w in zip(xs, weights):
                    linear(x, w)
                best = min(best, time.perf_counter() - start)
        return best

    floors = {}
    with torch.no_grad():
        prefill = step_seconds(n_prompt_tokens, len(next(iter(workloads.values()))), repeats=2)
        for name, out_lens in workloads.items():
            floors[name] = prefill
            running = [sum(n > s for n in out_lens) for s in range(1, max(out_lens))]
            for batch in set(running):
                floors[name] += running.count(batch) * step_seconds(batch, batch)
    return floors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF model directory; a random ~100M "
        "Llama is built there if it holds no config.json (default: a temp dir; with "
        "--matrix, SmolLM2-135M converted under --work-dir)",
    )
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len-min", type=int, default=32)
    parser.add_argument("--input-len-max", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--output-len-min", type=int, default=16, help="shortest output of the mixed workload"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only measure this engine")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="run each workload this many times, the two engines back to back each time "
        "(a slow spell of the machine then hits both); the table shows medians",
    )  # fmt: skip
    add_matrix_args(parser)
    args = parser.parse_args()
    if args.matrix:
        run_matrix(args)
        return

    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        args.model = build_default_model(args.model or os.path.join(tmp, "llama-100m"))
        vocab = AutoConfig.from_pretrained(args.model).vocab_size
        prompts = make_prompts(
            args.num_prompts, args.input_len_min, args.input_len_max, vocab, args.seed
        )
        rng = random.Random(args.seed + 1)
        workloads = {
            "fixed": [args.output_len] * len(prompts),
            "mixed": [rng.randint(args.output_len_min, args.output_len) for _ in prompts],
        }
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            max_num_seqs=max(256, len(prompts)),
            tensor_parallel_size=args.tensor_parallel_size,
        )
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        engines = {"vllm": functools.partial(run_vllm, llm, prompts)}
        if not args.skip_hf:
            dtype = getattr(torch, args.dtype)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
            run_hf(model, prompts[:2], [4, 4])  # warm-up
            engines["transformers"] = functools.partial(run_hf, model, prompts)
        seconds: dict[tuple[str, str], list[float]] = {}
        outputs: dict[tuple[str, str], list] = {}
        for _ in range(args.repeats):
            for name, lens in workloads.items():
                for engine, run in engines.items():
                    sec, out = run(lens)
                    seconds.setdefault((engine, name), []).append(sec)
                    outputs.setdefault((engine, name), out)
        del llm
        floors = {}
        if not args.skip_hf:
            floors = linear_floors(model, sum(len(p) for p in prompts), workloads)

    results = {key: statistics.median(secs) for key, secs in seconds.items()}
    n_in = sum(len(p) for p in prompts)
    print(
        f"\n{args.num_prompts} prompts ({n_in} prompt tokens), dtype={args.dtype}, "
        f"torch threads={torch.get_num_threads()}, TP={args.tensor_parallel_size}"
    )
    print(
        f"{'workload':<9}{'engine':<14}{'gen tokens':>11}{'seconds':>10}{'gen tok/s':>11}"
        f"{'total tok/s':>13}{'vs transformers':>17}"
    )
    for (engine, name), sec in sorted(results.items(), key=lambda kv: kv[0][0] != "vllm"):
        n_out = sum(workloads[name])
        base = results.get(("transformers", name), sec)
        print(
            f"{name:<9}{engine:<14}{n_out:>11}{sec:>10.2f}{n_out / sec:>11.1f}"
            f"{(n_in + n_out) / sec:>13.1f}{base / sec:>16.2f}x"
        )
    if args.repeats > 1:
        print(f"seconds are medians of {args.repeats} runs; ratio of each run:")
        for name in workloads:
            if ("transformers", name) in seconds:
                ratios = [
                    t / v for v, t in zip(seconds[("vllm", name)], seconds[("transformers", name)])
                ]
                print(f"{name}: " + " ".join(f"{r:.2f}x" for r in ratios))
    for name, floor in floors.items():
        hf = results[("transformers", name)]
        print(
            f"{name}: the linear layers alone take {floor:.2f} s here, so no engine can beat "
            f"transformers by more than {hf / floor:.2f}x on this machine"
        )
    for name in workloads:
        if ("transformers", name) in outputs:
            ours, ref = outputs[("vllm", name)], outputs[("transformers", name)]
            same = sum(list(a) == list(b) for a, b in zip(ours, ref))
            prefix = statistics.mean(common_prefix(a, b) for a, b in zip(ours, ref))
            print(
                f"{name}: greedy outputs identical to transformers: {same}/{len(ours)} "
                f"(mean common prefix {prefix:.1f} of {statistics.mean(workloads[name]):.1f} "
                "tokens)"
            )
    if args.dtype != "float32":
        print(
            f"{args.dtype}: a random model's top logits are often closer than one rounding "
            "step, so greedy sequences part after some tokens whenever the order of the "
            "float32 sums differs, as transformers' own batched and one-at-a-time runs do "
            "(benchmarks/README.md)"
        )


if __name__ == "__main__":
    main()
