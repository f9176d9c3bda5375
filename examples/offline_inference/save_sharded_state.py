"""Save each worker's slice of the model directly to a checkpoint, so that loading a
tensor-parallel model later reads, per worker, only that worker's files.

Example usage:

    python examples/offline_inference/save_sharded_state.py \
        --model /path/to/load \
        --quantization deepspeedfp \
        --tensor-parallel-size 2 \
        --output /path/to/save

Then the model can be loaded with

    llm = LLM(
        model="/path/to/save",
        load_format="sharded_state",
        quantization="deepspeedfp",
        tensor_parallel_size=2,
    )

With --quantization the weights are quantized after loading and saved quantized (fp8,
int8 or deepspeedfp); the checkpoint's manifest records the method, so quantization= may
also be left out when loading. Every engine flag is accepted (--dtype, ...), plus
--file-pattern and --max-file-size. The same command is available as `vllm save-sharded-state`.
"""

from vllm import EngineArgs
from vllm.entrypoints.save_sharded_state import add_save_args, main
from vllm.utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
EngineArgs.add_cli_args(parser)
add_save_args(parser)

if __name__ == "__main__":
    args = parser.parse_args()
    main(args)
