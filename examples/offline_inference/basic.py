"""Offline generation with the LLM API, and a sharded-state round trip.

    python examples/offline_inference/basic.py                 # built-in default model
    python examples/offline_inference/basic.py --model DIR     # any local HF checkpoint

With no --model, a small random-weight Llama (and tokenizer) is built in a temporary
directory, so this runs on a fresh machine with nothing downloaded. The script then
loads it the default way at tensor-parallel size 2 and generates (greedy), saves each
rank's slice with ``llm.save_sharded_state``, loads that back with
``load_format="sharded_state"``, generates the same prompts, and prints both load times
and whether the texts match (see docs/sharded_state.md).

With --model, it just generates. Every EngineArgs flag (--dtype,
--tensor-parallel-size, ...) is accepted.
"""

from __future__ import annotations

import os
import tempfile
import time

from vllm import LLM, EngineArgs, SamplingParams
from vllm.entrypoints.save_sharded_state import copy_metadata_files
from vllm.testing import make_model
from vllm.utils import FlexibleArgumentParser

PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def load_and_generate(params: SamplingParams, **llm_kwargs) -> tuple[LLM, float, list[str]]:
    start = time.perf_counter()
    llm = LLM(**llm_kwargs)
    load_s = time.perf_counter() - start
    texts = [out.outputs[0].text for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    for prompt, text in zip(PROMPTS, texts):
        print(f"  {prompt!r} -> {text!r}")
    return llm, load_s, texts


def sharded_state_demo(tmp: str, max_tokens: int) -> None:
    model_dir = os.path.join(tmp, "llama")
    out_dir = os.path.join(tmp, "llama-sharded-tp2")
    print("No --model given: building a random-weight Llama in", model_dir)
    make_model("llama", model_dir, vocab_size=512, hidden_size=256,
               intermediate_size=688, num_hidden_layers=4)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    print("\n1) Default load (Hugging Face safetensors), tensor_parallel_size=2:")
    llm, default_s, default_texts = load_and_generate(
        params, model=model_dir, tensor_parallel_size=2
    )

    print(f"\n2) Saving each rank's slice to {out_dir}")
    llm.save_sharded_state(out_dir)
    copy_metadata_files(model_dir, out_dir)  # config and tokenizer files
    del llm  # shuts the workers down

    print('\n3) load_format="sharded_state", tensor_parallel_size=2:')
    llm, sharded_s, sharded_texts = load_and_generate(
        params, model=out_dir, load_format="sharded_state", tensor_parallel_size=2
    )
    del llm

    print(f"\nLoad time, default:       {default_s:.2f} s")
    print(f"Load time, sharded_state: {sharded_s:.2f} s")
    print("Generated texts identical:", sharded_texts == default_texts)


def main() -> None:
    parser = FlexibleArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(model="")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    if not args.model:
        with tempfile.TemporaryDirectory() as tmp:
            sharded_state_demo(tmp, args.max_tokens)
        return
    engine_args = EngineArgs.from_cli_args(args)
    start = time.perf_counter()
    llm = LLM(**vars(engine_args))
    print(f"Engine ready in {time.perf_counter() - start:.2f} s")
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    for out in llm.generate(PROMPTS, params):
        print(f"Prompt: {out.prompt!r}\nGenerated: {out.outputs[0].text!r}\n")


if __name__ == "__main__":
    main()
