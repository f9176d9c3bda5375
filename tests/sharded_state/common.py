"""Shared helpers of the sharded-state tests: tiny models, engines, greedy tokens."""

from __future__ import annotations

import gc
import os

from safetensors import safe_open

from tests.utils import device_for
from vllm import LLM, SamplingParams

# arch -> vocabulary size (GPT-2's is odd, so padded vocabulary rows are exercised)
ARCHS = {"llama": 1000, "gpt2": 1003, "gpt_neox": 1000, "opt": 1000, "gpt_bigcode": 1000}
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_llm(model: str, tp: int = 1, **kwargs) -> LLM:
    return LLM(
        model=model,
        dtype=kwargs.pop("dtype", "float32"),
        device=kwargs.pop("device", device_for(tp)),
        max_model_len=128,
        num_gpu_blocks_override=64,
        tensor_parallel_size=tp,
        **kwargs,
    )


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def shutdown(llm: LLM) -> None:
    """Stop the engine's workers now (not whenever the garbage collector gets to it)."""
    llm.llm_engine.shutdown()
    del llm
    gc.collect()


def shard_files(path: str) -> dict[str, list[str]]:
    """file name -> tensor names, for every .safetensors file in ``path``."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out[name] = list(f.keys())
    return out
