"""The calls of upstream's examples/offline_inference/load_sharded_state.py: load_format
defaulting to sharded_state, LLM(**asdict(engine_args)), generate one prompt."""

import dataclasses

from vllm import LLM, EngineArgs, SamplingParams
from vllm.utils.argparse_utils import FlexibleArgumentParser


def parse_args():
    parser = FlexibleArgumentParser()
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(load_format="sharded_state")
    parser.add_argument("--prompt", type=str, default="Hello, world!")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    return parser.parse_args()


def main():
    args = parse_args()
    engine_args = EngineArgs.from_cli_args(args)
    print(f"Loading model from {engine_args.model} using format {engine_args.load_format}")
    print(f"Tensor parallel size: {engine_args.tensor_parallel_size}")
    llm = LLM(**dataclasses.asdict(engine_args))
    sampling_params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens
    )
    outputs = llm.generate(args.prompt, sampling_params)
    for output in outputs:
        print(f"Full output: {args.prompt}{output.outputs[0].text!r}")


if __name__ == "__main__":
    main()
