"""Offline generation throughput: this engine vs transformers ``generate``, in one run.

Both run the same random-weight model on the same prompts, greedy, with a fixed
number of new tokens per prompt (EOS ignored), so the work is identical. The model
is built locally (nothing is downloaded): a ~100M-parameter Llama by default.

    python benchmarks/benchmark_throughput.py                # 32 prompts, 128 new tokens
    python benchmarks/benchmark_throughput.py --model DIR    # an existing HF checkpoint
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch


def build_default_model(path: str) -> str:
    from vllm.testing import LLAMA_100M, make_model

    if not os.path.isfile(os.path.join(path, "config.json")):
        make_model("llama", path, vocab_size=32000, init_std=0.02, **LLAMA_100M)
    return path


def make_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(n)]


def run_vllm(args, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=max(256, len(prompts)),
              tensor_parallel_size=args.tensor_parallel_size)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    del llm
    return elapsed, [o.outputs[0].token_ids for o in outputs]


def run_hf(args, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    # Left-pad into one batch, as a transformers user batches generate().
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=args.output_len,
                  min_new_tokens=args.output_len)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], **{**kwargs, "max_new_tokens": 4,
                                                            "min_new_tokens": 4})
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        elapsed = time.perf_counter() - start
    return elapsed, out[:, width:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory; a random ~100M "
                        "Llama is built there if it holds no config.json (default: a temp dir)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len-min", type=int, default=32)
    parser.add_argument("--input-len-max", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only measure this engine")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        args.model = build_default_model(args.model or os.path.join(tmp, "llama-100m"))
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(args.model).vocab_size
        prompts = make_prompts(args.num_prompts, args.input_len_min, args.input_len_max, vocab,
                               args.seed)
        n_in = sum(len(p) for p in prompts)
        n_out = args.num_prompts * args.output_len
        results = {"vllm (this engine)": run_vllm(args, prompts)}
        if not args.skip_hf:
            results["transformers generate"] = run_hf(args, prompts)

    print(f"\n{args.num_prompts} prompts, {n_in} prompt tokens, {n_out} generated tokens, "
          f"dtype={args.dtype}, torch threads={torch.get_num_threads()}")
    print(f"{'engine':<24}{'seconds':>10}{'gen tok/s':>12}{'total tok/s':>13}{'ratio':>8}")
    base = results.get("transformers generate", next(iter(results.values())))[0]
    for name, (sec, _) in results.items():
        print(f"{name:<24}{sec:>10.2f}{n_out / sec:>12.1f}{(n_in + n_out) / sec:>13.1f}"
              f"{base / sec:>7.2f}x")
    if "transformers generate" in results:
        ours, ref = results["vllm (this engine)"][1], results["transformers generate"][1]
        same = sum(a == b for a, b in zip(ours, ref))
        print(f"greedy outputs identical to transformers: {same}/{len(ours)}")


if __name__ == "__main__":
    main()
