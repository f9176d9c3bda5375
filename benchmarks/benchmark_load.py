"""Start-up time and bytes read: ``load_format="sharded_state"`` vs the default loader.

Builds a random-weight Llama-shaped checkpoint (float32, about --size-mb MB; nothing is
downloaded), saves it sharded at each tensor-parallel size, then for TP in --tp measures,
each load in a fresh process:

- start-up: wall time of ``LLM(...)`` (worker start, weight load, KV cache set-up);
- weights: the "Loading weights took" seconds each rank logs (slowest rank shown);
- read_bytes / rchar per rank, from /proc/self/io after start-up (collective_rpc).
  read_bytes counts bytes fetched from the block device: the checkpoint files are
  evicted from the page cache before every load (posix_fadvise DONTNEED; --warm skips
  that), otherwise it is ~0. rchar counts read() calls, including Python imports, but
  not pages touched through mmap (the default loader maps safetensors files).

    python benchmarks/benchmark_load.py                  # ~300 MB, TP 1, 2, 4
    python benchmarks/benchmark_load.py --size-mb 1000 --tp 1 2
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 768, 2048, 12, 4, 32000


def build_checkpoint(path: str, size_mb: float) -> int:
    """A Llama with as many layers as fit in size_mb (float32); returns the layer count."""
    from vllm.testing import make_model

    head_dim = HIDDEN // HEADS
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim + 3 * HIDDEN * INTER
    embeddings = 2 * VOCAB * HIDDEN  # embed_tokens + untied lm_head
    layers = max(1, round((size_mb * 1e6 / 4 - embeddings) / per_layer))
    make_model("llama", path, vocab_size=VOCAB, init_std=0.02, hidden_size=HIDDEN,
               intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS)  # fmt: skip
    return layers


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))


def evict(path: str) -> None:
    """Drop the directory's weight files from the page cache (no root needed)."""
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_io(worker=None) -> dict[str, int]:
    """/proc/self/io of the calling process (run on every rank via collective_rpc)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def child(args: argparse.Namespace) -> None:
    """One load in this fresh process; prints a JSON line."""
    from vllm import LLM

    kwargs = {"load_format": args.load_format} if args.load_format != "auto" else {}
    start = time.perf_counter()
    llm = LLM(model=args.model, tensor_parallel_size=args.tp, **kwargs)
    startup = time.perf_counter() - start
    io = llm.collective_rpc(proc_io)
    print("RESULT " + json.dumps({"startup": startup, "io": io}), flush=True)
    del llm


def measure(model: str, tp: int, load_format: str, warm: bool) -> dict:
    if not warm:
        evict(model)
    cmd = [sys.executable, __file__, "--child", "--model", model, "--tp", str(tp),
           "--load-format", load_format]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    result = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    # "(rank 1 pid 123) INFO ... Loading weights took 0.09 seconds"; no prefix at TP=1.
    weights = {}
    for m in re.finditer(r"^(?:\(rank (\d+)[^)]*\) )?.*Loading weights took ([\d.]+)", out, re.M):
        weights[int(m.group(1) or 0)] = float(m.group(2))
    result["weights"] = [weights.get(r, float("nan")) for r in range(tp)]
    return result


def save_sharded(model: str, out: str, tp: int) -> None:
    from vllm import LLM
    from vllm.entrypoints.save_sharded_state import copy_metadata_files

    llm = LLM(model=model, tensor_parallel_size=tp)
    llm.save_sharded_state(out)
    copy_metadata_files(model, out)
    del llm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=300, help="checkpoint size (float32)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warm", action="store_true", help="leave the page cache as it is")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--load-format", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.tp = args.tp[0]
        return child(args)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = os.path.join(tmp, "hf")
        layers = build_checkpoint(model, args.size_mb)
        total = dir_bytes(model)
        print(f"Checkpoint: Llama, {layers} layers, {total / 1e6:.0f} MB float32 in {model}")
        rows = []
        for tp in args.tp:
            sharded = os.path.join(tmp, f"sharded-tp{tp}")
            save_sharded(model, sharded, tp)
            d = measure(model, tp, "auto", args.warm)
            s = measure(sharded, tp, "sharded_state", args.warm)
            rows.append((tp, d, s))
            print(f"TP={tp}: default {d['startup']:.2f} s, sharded {s['startup']:.2f} s")

    def per_rank(r: dict, key: str) -> float:  # mean over ranks, MB
        return sum(io[key] for io in r["io"]) / len(r["io"]) / 1e6

    cache = "warm page cache" if args.warm else "files evicted from page cache before each load"
    print(f"\n{total / 1e6:.0f} MB checkpoint, {cache}; per-rank values are means over ranks;")
    print("ratio = sharded / default\n")
    head = (f"{'TP':>3} | {'start-up s':^22} | {'weights s (max rank)':^22} | "
            f"{'read_bytes MB/rank':^24} | {'rchar MB/rank':^24}")  # fmt: skip
    sub = f"{'':>3} | " + " | ".join(
        [f"{'default':>7} {'sharded':>7} {'ratio':>6}"] * 2
        + [f"{'default':>8} {'sharded':>8} {'ratio':>6}"] * 2
    )
    print(head + "\n" + sub + "\n" + "-" * len(sub))
    for tp, d, s in rows:
        cells = [f"{tp:>3}"]
        for a, b in [(d["startup"], s["startup"]), (max(d["weights"]), max(s["weights"]))]:
            cells.append(f"{a:>7.2f} {b:>7.2f} {b / a if a else float('nan'):>6.2f}")
        for key in ("read_bytes", "rchar"):
            a, b = per_rank(d, key), per_rank(s, key)
            cells.append(f"{a:>8.1f} {b:>8.1f} {b / a if a else float('nan'):>6.2f}")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
