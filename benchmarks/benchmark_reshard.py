"""`vllm reshard` throughput against the raw copy rate of the same bytes.

Builds a random Llama (default ~400 MB in float32; nothing is downloaded), converts it
to a TP=2 sharded-state checkpoint with `vllm reshard`, then times, in turns:

- ``raw copy``: every file of the TP=2 checkpoint read whole and written to a new file
  with large writes and an fsync, the floor of any conversion of the same bytes on
  this disk and page cache;
- ``reshard 2 -> N`` for each ``--to`` size: the whole command's work in this process
  (read the byte ranges of each new slice, write, fsync, manifest, atomic swap).

Prints seconds (medians over ``--repeats``), GB/s over the checkpoint's bytes, and the
rate as a fraction of the raw copy's. The issue's goal: at least 50%.

    python benchmarks/benchmark_reshard.py
    python benchmarks/benchmark_reshard.py --to 1 4 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_info import cpu_name  # noqa: E402

from vllm.entrypoints.reshard import reshard  # noqa: E402
from vllm.testing import LLAMA_100M, make_model  # noqa: E402

CHUNK = 64 << 20


def raw_copy(src: str, dst: str) -> None:
    """Read each shard file of ``src`` whole and write it to ``dst`` (fsync each)."""
    os.makedirs(dst)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for name in sorted(os.listdir(src)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(src, name), "rb", buffering=0) as fin:
            fd = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                while n := fin.readinto(buf):
                    os.write(fd, view[:n])
                os.fsync(fd)
            finally:
                os.close(fd)


def checkpoint_bytes(path: str) -> int:
    names = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    return sum(os.path.getsize(os.path.join(path, n)) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--to", type=int, nargs="+", default=[1, 4], help="target TP sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = tempfile.mkdtemp(dir=args.workdir)
    try:
        hf = make_model("llama", os.path.join(work, "hf"), vocab_size=32000, **LLAMA_100M)
        src = os.path.join(work, "tp2")
        reshard(hf, src, 2)
        nbytes = checkpoint_bytes(src)
        print(cpu_name())
        print(f"checkpoint: {nbytes / 1e9:.2f} GB at TP=2, float32, {args.repeats} rounds")
        times: dict[str, list[float]] = {"raw copy": []}
        times.update({f"reshard 2 -> {n}": [] for n in args.to})
        for _ in range(args.repeats):  # methods take turns: the VM's speed drifts
            for name in times:
                out = os.path.join(work, "out")
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                if name == "raw copy":
                    raw_copy(src, out)
                else:
                    reshard(src, out, int(name.rsplit(" ", 1)[1]))
                times[name].append(time.perf_counter() - start)
        raw = statistics.median(times["raw copy"])
        print(f"{'method':<16}{'seconds':>9}{'GB/s':>8}{'of raw copy':>13}")
        for name, runs in times.items():
            t = statistics.median(runs)
            print(f"{name:<16}{t:>9.2f}{nbytes / 1e9 / t:>8.2f}{raw / t:>12.0%}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
