"""The calls of upstream's tests/model_executor/model_loader/test_sharded_state_loader.py:
writer and generators in spawned processes, engine_core.save_sharded_state(path=...),
LLM(enable_lora=..., gpu_memory_utilization=..., enforce_eager=...), outputs' __dict__
compared before and after. Usage: sharded_state_loader.py MODEL_DIR TP_SIZE."""

import fnmatch
import multiprocessing as mp
import os
import shutil
import sys
from tempfile import TemporaryDirectory

import torch

from vllm import LLM, SamplingParams
from vllm.model_executor.model_loader import ShardedStateLoader
from vllm.platforms import current_platform

prompts = ["Hello, my name is", "The capital of France is"]
sampling_params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def check_filter_subtensors():
    state_dict = {"a": torch.empty(2), "b": torch.empty((2, 4)), "c": torch.empty((2, 4, 8))}
    state_dict.update({"x": state_dict["b"], "y": state_dict["c"][1, 2, :]})
    filtered = ShardedStateLoader._filter_subtensors(state_dict)
    assert tuple(filtered) == ("a", "b", "c"), tuple(filtered)


def _run_writer(input_dir, output_dir, weights_patterns, **kwargs):
    llm_sharded_writer = LLM(model=input_dir, **kwargs)
    llm_sharded_writer.llm_engine.engine_core.save_sharded_state(path=output_dir)
    for file in os.listdir(input_dir):
        if os.path.isdir(os.path.join(input_dir, file)):
            shutil.copytree(os.path.join(input_dir, file), os.path.join(output_dir, file))
        elif not any(fnmatch.fnmatch(file, ext) for ext in weights_patterns):
            shutil.copy(os.path.join(input_dir, file), output_dir)


def _run_generate(input_dir, queue, **kwargs):
    llm = LLM(model=input_dir, **kwargs)
    gen = llm.generate(prompts, sampling_params)
    queue.put([g.outputs[0].__dict__ for g in gen])
    queue.close()
    queue.join_thread()


def _generate(ctx, input_dir, **kwargs):
    queue = ctx.Queue()
    p = ctx.Process(target=_run_generate, args=(input_dir, queue), kwargs=kwargs)
    p.start()
    out = queue.get()  # before join: a full queue would block the child
    p.join()
    return out


def main(input_dir: str, tp_size: int):
    check_filter_subtensors()
    ctx = mp.get_context("spawn")
    platform_args = {"max_num_seqs": 1} if current_platform.is_rocm() else {}
    common = dict(gpu_memory_utilization=0.8, tensor_parallel_size=tp_size, **platform_args)
    with TemporaryDirectory() as output_dir:
        p = ctx.Process(
            target=_run_writer,
            args=(input_dir, output_dir, ("*.safetensors",)),
            kwargs=dict(enforce_eager=True, **common),
        )
        p.start()
        p.join()
        assert p.exitcode == 0, p.exitcode
        out_before = _generate(ctx, input_dir, enable_lora=True, **common)
        out_after = _generate(
            ctx, output_dir, enable_lora=True, load_format="sharded_state", **common
        )
        print(f"Generated text: {[o['text'] for o in out_after]!r}")
        assert out_before == out_after, (out_before, out_after)
        print("outputs equal before and after the sharded save")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
