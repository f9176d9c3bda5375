"""The calls of upstream's examples/offline_inference/save_sharded_state.py: EngineArgs from
CLI flags, LLM(**asdict(engine_args)), llm.llm_engine.engine_core.save_sharded_state."""

import dataclasses
import os
import shutil
from pathlib import Path

from vllm import LLM, EngineArgs
from vllm.model_executor.model_loader import ShardedStateLoader
from vllm.utils.argparse_utils import FlexibleArgumentParser


def parse_args():
    parser = FlexibleArgumentParser()
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--output", "-o", required=True, type=str)
    parser.add_argument("--file-pattern", type=str, default=ShardedStateLoader.DEFAULT_PATTERN)
    parser.add_argument("--max-file-size", type=int, default=5 * 1024**3)
    return parser.parse_args()


def main(args):
    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.enable_lora:
        raise ValueError("Saving with enable_lora=True is not supported!")
    model_path = engine_args.model
    llm = LLM(**dataclasses.asdict(engine_args))
    Path(args.output).mkdir(exist_ok=True)
    assert hasattr(llm.llm_engine, "engine_core")  # upstream's test for its V1 engine
    llm.llm_engine.engine_core.save_sharded_state(
        path=args.output, pattern=args.file_pattern, max_size=args.max_file_size
    )
    for file in os.listdir(model_path):
        if os.path.splitext(file)[1] not in (".bin", ".pt", ".safetensors"):
            if os.path.isdir(os.path.join(model_path, file)):
                shutil.copytree(os.path.join(model_path, file), os.path.join(args.output, file))
            else:
                shutil.copy(os.path.join(model_path, file), args.output)
    print(f"Saved to {args.output}: {sorted(os.listdir(args.output))}")


if __name__ == "__main__":
    main(parse_args())
