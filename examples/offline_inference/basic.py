"""Offline generation with the LLM API.

    python examples/offline_inference/basic.py                 # built-in default model
    python examples/offline_inference/basic.py --model DIR     # any local HF checkpoint

With no --model, a small random-weight Llama (and tokenizer) is built in a temporary
directory first, so this runs on a fresh machine with nothing downloaded. Every
EngineArgs flag (--dtype, --tensor-parallel-size, ...) is accepted.
"""

from __future__ import annotations

import tempfile
import time

from vllm import LLM, EngineArgs, SamplingParams
from vllm.testing import make_model
from vllm.utils import FlexibleArgumentParser

PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def main() -> None:
    parser = FlexibleArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(model="")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            print("No --model given: building a random-weight Llama in", tmp)
            args.model = make_model("llama", tmp, vocab_size=512, hidden_size=256,
                                    intermediate_size=688, num_hidden_layers=4)
        engine_args = EngineArgs.from_cli_args(args)
        start = time.perf_counter()
        llm = LLM(**vars(engine_args))
        print(f"Engine ready in {time.perf_counter() - start:.2f} s")
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
        for out in llm.generate(PROMPTS, params):
            print(f"Prompt: {out.prompt!r}\nGenerated: {out.outputs[0].text!r}\n")


if __name__ == "__main__":
    main()
