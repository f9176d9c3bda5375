"""Model loading against the hardware limit: raw reads, upstream's loop, our loaders.

Builds a synthetic Llama-shaped bfloat16 checkpoint (default ~2 GB; nothing is
downloaded), saves it sharded at each tensor-parallel size, and prints:

1. save: per TP, the raw write bandwidth (large writes + fsync of the same bytes) next
   to ``write_file`` without and with the CRC-32 the manifest records, and the whole
   ``save_sharded_state`` (temp dir, checks, manifest, swap) into an empty directory;
2. load: per TP and method, seconds (first rank start to last rank done), GB/s (bytes of
   all ranks / seconds), ratio to raw, bytes read per rank (``rchar``: read() calls of
   the process, which memory-mapped reads do not show; ``disk``: bytes fetched from the
   block device in the cold run), and peak RSS growth per rank as a multiple of its
   parameter bytes. Warm (files in the page cache) and cold (files evicted with
   posix_fadvise DONTNEED before the run) side by side, each against the raw read of
   the same kind.
   Methods: ``raw`` reads the rank's sharded files with large sequential reads into one
   buffer allocated (not touched) before the clock starts, as the model's parameters are;
   ``raw (touched)`` into a buffer already written once, the pure copy speed;
   ``upstream loop`` is what upstream's sharded loader does: ``safe_open(...)`` then
   ``get_tensor(key)`` and ``param.copy_(tensor)`` per key, file after file;
   ``default`` is our loader for the Hugging Face files (each rank reads its slices);
   ``sharded_state`` our sharded loader (bfloat16 on the CPU: the files are mapped),
   ``mmap=0`` the same reading the files with threads, ``verify`` reading and checking
   every file's CRC-32.
   A second table compares ``default`` with ``upstream loop`` round by round (the two run
   back to back in each round, so the ratio is steadier than the medians' on a noisy VM).
   With ``--num-tensors``, a further table puts the two checkpoints side by side: each
   method's cost per extra tensor in microseconds (0 would be flat with tensor count).
3. resharded: a save at ``--reshard-from`` (default 2) loaded at every other ``--tp`` N
   (each rank reads only the rows / column ranges its slices are made of), against the
   save at N mapped and read with threads (``mmap=0``: the fair comparison per byte, as
   a resharded load cannot map files) and the default loader at N: seconds, GB read (the
   loaders' own count), bytes per rank, and seconds per GB read over ``mmap=0``'s
   (the goal: within 1.5x). ``--only reshard`` runs this section alone.
4. start-up: ``LLM(...)`` to ready for a ~135M-parameter bfloat16 Llama at TP 1 and 2,
   with the engine's breakdown (imports, config, tokenizer, worker processes, weights,
   KV cache).

Each measurement runs in fresh processes, one per rank, started together.

    python benchmarks/benchmark_load.py                          # ~2 GB, TP 1 2 4
    python benchmarks/benchmark_load.py --size 0.5 --tp 1 2      # quicker
    python benchmarks/benchmark_load.py --num-tensors 10000      # many small tensors too
    python benchmarks/benchmark_load.py --size 0.5 --only reshard  # TP 2 -> 1 and 4 only

Warm loads run ``--repeats`` times (default 3), the methods in turn, and each row is the
median run: on a small VM a single load varies by 2x.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from cpu_info import cpu_name

VOCAB = 32000
LARGE = dict(hidden=2048, heads=16, kv_heads=4)  # head_dim 128: few large tensors
STARTUP_SHAPE = dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=24,
                     num_attention_heads=10, num_key_value_heads=2, vocab_size=49152,
                     tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip
CHUNK = 64 << 20


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)  # one clock for all processes


# ---- checkpoints --------------------------------------------------------------------------


def llama_shape(size_gb: float, num_tensors: int | None) -> dict:
    """Hidden size and layer count of a Llama of about ``size_gb`` GB in bfloat16; with
    ``num_tensors``, a narrow one with about that many tensors."""
    if num_tensors is None:
        shape = dict(LARGE)
    else:
        layers = max(1, (num_tensors - 3) // 9)
        h = (size_gb * 1e9 / layers / 24.5) ** 0.5  # 2 bytes x (4h^2 + 3 h 2.75h) per layer
        hidden = max(256, round(h / 256) * 256)
        shape = dict(hidden=hidden, heads=hidden // 64, kv_heads=hidden // 64)
    h = shape["hidden"]
    inter = round(2.75 * h / 64) * 64
    kv = shape["kv_heads"] * h // shape["heads"]
    layer_bytes = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h)
    embed_bytes = 2 * 2 * VOCAB * h
    shape["inter"] = inter
    shape["layers"] = max(1, round((size_gb * 1e9 - embed_bytes) / layer_bytes))
    return shape


def build_checkpoint(path: str, shape: dict) -> None:
    """A Hugging Face Llama directory: config, index, safetensors files of <= 1 GB."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from vllm.testing import make_tokenizer

    h, inter = shape["hidden"], shape["inter"]
    kv = shape["kv_heads"] * h // shape["heads"]
    os.makedirs(path, exist_ok=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter,
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                num_key_value_heads=shape["kv_heads"], tie_word_embeddings=False,
                torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
                ).save_pretrained(path)  # fmt: skip
    make_tokenizer(path)
    names = [("model.embed_tokens.weight", (VOCAB, h))]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                  (p + "post_attention_layernorm.weight", (h,))]  # fmt: skip
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]
    gen = torch.Generator().manual_seed(0)
    files, part, size = [], {}, 0
    for name, dims in names:
        part[name] = torch.empty(dims, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
        size += part[name].nbytes
        if size >= 1e9 or name == names[-1][0]:
            files.append(part)
            part, size = {}, 0
    weight_map = {}
    for i, tensors in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def weight_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def evict(paths: list[str]) -> None:
    """Drop files from the page cache (no root needed)."""
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[str]) -> None:
    buf = bytearray(CHUNK)
    for f in paths:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# ---- rank processes -----------------------------------------------------------------------


def run_ranks(task: str, tp: int, **kwargs) -> list[dict]:
    """Run ``task`` in ``tp`` fresh processes (one per rank); their results by rank."""
    from vllm.utils import get_open_port

    port = get_open_port()
    procs = []
    for rank in range(tp):
        spec = json.dumps(dict(task=task, rank=rank, tp=tp, port=port, **kwargs))
        cmd = [sys.executable, __file__, "--rank-task", spec]
        pipe = subprocess.PIPE
        procs.append(subprocess.Popen(cmd, stdout=pipe, stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            sys.exit(f"rank task {task} (TP={tp}) failed:\n{out[-4000:]}")
        results.append(json.loads(lines[-1][7:]))
    return results


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def rank_task(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from vllm.distributed import init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs

    rank, tp = spec["rank"], spec["tp"]
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // tp))
    init_distributed_environment(tp, rank, f"tcp://127.0.0.1:{spec['port']}", "gloo")
    load_format = spec.get("load_format", "auto")
    extra = {k: spec[k] for k in ("verify", "mmap") if k in spec} or None
    vllm_config = EngineArgs(model=spec["model"], tensor_parallel_size=tp, dtype="bfloat16",
                             load_format=load_format,
                             model_loader_extra_config=extra).create_engine_config()  # fmt: skip
    result = TASKS[spec["task"]](spec, vllm_config, Barrier(dist))
    print("RESULT " + json.dumps(result), flush=True)


class Barrier:
    """dist.barrier() across the ranks; nothing to wait for at TP=1."""

    def __init__(self, dist):
        self.dist = dist

    def barrier(self) -> None:
        if self.dist.is_initialized():
            self.dist.barrier()


def _timed(dist, fn, base_rss: int | None = None) -> dict:
    """Run ``fn`` between two barriers; its span, I/O counters and peak RSS above
    ``base_rss`` (default: the RSS when ``fn`` starts)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    rss0, io0 = proc_status("VmRSS"), proc_io()
    rss0 = rss0 if base_rss is None else base_rss
    dist.barrier()
    start = now()
    fn()
    end = now()
    io1 = proc_io()
    dist.barrier()
    return dict(start=start, end=end, rchar=io1["rchar"] - io0["rchar"],
                disk=io1["read_bytes"] - io0["read_bytes"],
                rss=proc_status("VmHWM") - rss0)  # fmt: skip


def _rank_files(spec: dict) -> list[str]:
    return sorted(glob.glob(os.path.join(spec["model"], f"model-rank-{spec['rank']}-part-*")))


def task_raw(spec: dict, vllm_config, dist) -> dict:
    import torch

    files = _rank_files(spec)
    base = proc_status("VmRSS")
    buf = torch.empty(sum(os.path.getsize(f) for f in files), dtype=torch.uint8)
    if spec.get("touched"):
        buf.fill_(1)
    view = memoryview(buf.numpy())

    def read() -> None:
        pos = 0
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            end, offset = pos + os.path.getsize(f), 0
            while pos < end:
                n = os.preadv(fd, [view[pos : min(end, pos + CHUNK)]], offset)
                pos, offset = pos + n, offset + n
            os.close(fd)

    return dict(_timed(dist, read, base), params=buf.numel())


def _model(vllm_config):
    from vllm.model_executor.model_loader.base_loader import initialize_model

    model = initialize_model(vllm_config.model_config, vllm_config.device_config.torch_device)
    return model, sum(p.nbytes for p in model.parameters())


def task_loop(spec: dict, vllm_config, dist) -> dict:
    """Upstream's sharded loader: safe_open, get_tensor, param.copy_, file after file."""
    import torch
    from safetensors import safe_open

    from vllm.model_executor.model_loader.state_dict_utils import filter_subtensors

    base = proc_status("VmRSS")
    model, nbytes = _model(vllm_config)
    state = filter_subtensors(model.state_dict())

    def load() -> None:
        with torch.no_grad():
            for path in _rank_files(spec):
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        state[key].copy_(f.get_tensor(key))

    return dict(_timed(dist, load, base), params=nbytes)


def task_loader(spec: dict, vllm_config, dist) -> dict:
    from vllm.model_executor.model_loader import get_model_loader

    base = proc_status("VmRSS")
    model, nbytes = _model(vllm_config)
    loader = get_model_loader(vllm_config.load_config)
    load = lambda: loader.load_weights(model, vllm_config)  # noqa: E731
    # ``loaded``: the loader's own count of the bytes it read or mapped (``rchar`` misses
    # mapped pages, e.g. a resharded load's column ranges copied out of a mapping).
    return dict(_timed(dist, load, base), params=nbytes, loaded=loader.bytes_read)


def task_save(spec: dict, vllm_config, dist) -> dict:
    """Load from the HF files, then time: raw writes, write_file without and with CRC-32,
    and save_sharded_state into an empty directory; then save into spec['out'] (untimed)
    for the loads."""
    import torch

    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.safetensors.writer import write_file
    from vllm.model_executor.model_loader.sharded_state.saver import save_sharded_state
    from vllm.model_executor.model_loader.state_dict_utils import filter_subtensors

    model = get_model_loader(vllm_config.load_config).load_model(vllm_config)
    state = filter_subtensors(model.state_dict())
    nbytes = sum(t.nbytes for t in state.values())
    if spec.get("untimed"):  # only the checkpoint for the loads
        save_sharded_state(model, spec["out"], vllm_config=vllm_config)
        return {"bytes": nbytes}
    scratch = os.path.join(spec["scratch"], f"rank{spec['rank']}")
    os.makedirs(scratch, exist_ok=True)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())

    def raw() -> None:
        fd = os.open(os.path.join(scratch, "raw"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        pos = 0
        while pos < nbytes:
            pos += os.write(fd, view[pos : pos + CHUNK])
        os.fsync(fd)
        os.close(fd)

    def plain() -> None:
        write_file(os.path.join(scratch, "a"), state.items(), checksum=False)

    def with_crc() -> None:
        write_file(os.path.join(scratch, "b"), state.items())

    # Like the other methods' files, the saved directory is removed between runs: each
    # save writes into an empty one (replacing a checkpoint adds deleting its files).
    fresh = os.path.join(spec["scratch"], "sharded")

    def save() -> None:
        save_sharded_state(model, fresh, vllm_config=vllm_config)

    out = {"bytes": nbytes}
    # The first write of a process pays for growing the page cache: an untimed one first;
    # then every method SAVE_REPEATS times, in turn (the table takes the fastest).
    steps = [("raw", raw), ("write_file", plain), ("write_file+crc", with_crc),
             ("save_sharded_state", save)]  # fmt: skip
    _timed(dist, raw)
    for name, fn in steps * SAVE_REPEATS:
        out.setdefault(name, []).append(_timed(dist, fn))
        for f in glob.glob(os.path.join(scratch, "*")):
            os.remove(f)
        if spec["rank"] == 0:
            shutil.rmtree(fresh, ignore_errors=True)
        dist.barrier()
    save_sharded_state(model, spec["out"], vllm_config=vllm_config)
    return out


def task_startup(spec: dict, vllm_config=None, dist=None) -> dict:
    """Not a rank task: one engine start in this fresh process."""
    start = time.perf_counter()
    from vllm import LLM

    imports = time.perf_counter() - start
    kwargs = {"load_format": spec["load_format"]} if spec["load_format"] != "auto" else {}
    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="bfloat16", tensor_parallel_size=spec["tp"], **kwargs)
    ready = time.perf_counter() - start
    times = dict(llm.llm_engine.startup_times, imports=imports, ready=ready)
    del llm
    return times


TASKS = {"raw": task_raw, "loop": task_loop, "loader": task_loader, "save": task_save}


# ---- the tables ---------------------------------------------------------------------------

SAVE_REPEATS = 3  # save measurements per method; the table takes the fastest

METHODS = [  # (label, task, extra spec, which directory)
    ("raw", "raw", {}, "sharded"),
    ("raw (touched)", "raw", {"touched": True}, "sharded"),
    ("upstream loop", "loop", {}, "sharded"),
    ("default", "loader", {"load_format": "auto"}, "hf"),
    ("sharded_state", "loader", {"load_format": "sharded_state"}, "sharded"),
    ("sharded_state mmap=0", "loader", {"load_format": "sharded_state", "mmap": False}, "sharded"),
    ("sharded_state verify", "loader", {"load_format": "sharded_state", "verify": True}, "sharded"),
]


def progress(line: str) -> None:
    """A line on stderr as each measurement ends (the tables come at the end)."""
    print(line, file=sys.stderr, flush=True)


def span(results: list[dict], key: str | None = None) -> float:
    rs = [r[key] for r in results] if key else results
    return max(r["end"] for r in rs) - min(r["start"] for r in rs)


def measure_loads(
    label: str, hf: str, sharded: dict[int, str], tps: list[int], cold: bool, repeats: int
) -> list:
    """One row per (TP, method): the median-time run of ``repeats`` (warm; cold runs
    once), the methods taking turns so that a slow spell of the machine hits them all."""
    runs: dict[tuple[int, str], list[dict]] = {}
    all_files = weight_files(hf) + [f for d in sharded.values() for f in weight_files(d)]
    for _ in range(1 if cold else repeats):
        for tp in tps:
            for name, task, extra, where in METHODS:
                if name == "raw (touched)" and cold:
                    continue
                model = hf if where == "hf" else sharded[tp]
                if cold:
                    evict(all_files)
                else:
                    warm(weight_files(model))
                res = run_ranks(task, tp, model=model, **extra)
                progress(f"{label} TP={tp} {'cold' if cold else 'warm'} {name}: "
                         f"{span(res):.2f} s")  # fmt: skip
                runs.setdefault((tp, name), []).append(
                    dict(
                        seconds=span(res),
                        rchar=max(r["rchar"] for r in res),
                        disk=max(r["disk"] for r in res),
                        rss=max(r["rss"] / r["params"] for r in res),
                    )  # fmt: skip
                )
    rows = []
    for (tp, name), results in runs.items():
        each = [r["seconds"] for r in results]  # in run order, for paired comparisons
        results = sorted(results, key=lambda r: r["seconds"])
        rows.append(
            dict(ckpt=label, tp=tp, method=name, cold=cold, each=each, **results[len(results) // 2])
        )
    return rows


def print_load_table(rows: list, total: dict[str, int]) -> None:
    warm = {(r["ckpt"], r["tp"], r["method"]): r for r in rows if not r["cold"]}
    cold = {(r["ckpt"], r["tp"], r["method"]): r for r in rows if r["cold"]}
    head = (f"{'checkpoint':<12} {'TP':>2} {'method':<21} | "
            f"{'warm s':>7} {'GB/s':>6} {'vs raw':>6} | {'cold s':>7} {'GB/s':>6} {'vs raw':>6} | "
            f"{'rchar MB/rank':>13} {'disk MB/rank':>12} | {'peak RSS/params':>15}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for key, w in warm.items():
        ckpt, tp, method = key
        gb = total[ckpt] / 1e9
        raw_w = warm[(ckpt, tp, "raw")]["seconds"]
        c = cold.get(key)
        cold_cells = f"{'':>21}"
        if c:
            ratio = cold[(ckpt, tp, "raw")]["seconds"] / c["seconds"]
            cold_cells = f"{c['seconds']:>7.2f} {gb / c['seconds']:>6.2f} {ratio:>5.2f}x"
        disk = f"{c['disk'] / 1e6:>12.0f}" if c else f"{'':>12}"
        rss = f"{w['rss']:>15.2f}" if method != "raw (touched)" else f"{'':>15}"
        print(f"{ckpt:<12} {tp:>2} {method:<21} | {w['seconds']:>7.2f} {gb / w['seconds']:>6.2f} "
              f"{raw_w / w['seconds']:>5.2f}x | {cold_cells} | {w['rchar'] / 1e6:>13.0f} {disk} "
              f"| {rss}")  # fmt: skip


def print_paired(rows: list, method: str, baseline: str) -> None:
    """``method`` against ``baseline`` run by run: the two ran back to back in each round,
    so a slow spell of the machine hits both; their ratio is steadier than the medians'."""
    warm = {(r["ckpt"], r["tp"], r["method"]): r["each"] for r in rows if not r["cold"]}
    print(f"\n{method} against {baseline}, paired by round ({baseline} s / {method} s; "
          "above 1: faster)")  # fmt: skip
    head = f"{'checkpoint':<12} {'TP':>2} | {'median':>6} | {'rounds, sorted':<30}"
    print(head + "\n" + "-" * len(head))
    for (ckpt, tp, name), ours in warm.items():
        theirs = warm.get((ckpt, tp, baseline))
        if name != method or theirs is None:
            continue
        ratios = sorted(b / a for a, b in zip(ours, theirs))
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{ckpt:<12} {tp:>2} | {ratios[len(ratios) // 2]:>5.2f}x | {each}")


def print_tensor_cost(rows: list, counts: dict[str, int], total: dict[str, int]) -> None:
    """What each extra tensor costs a load (warm runs): many-small's seconds less
    few-large's scaled to many-small's bytes (the two are built to about the same size),
    over the difference in tensor count."""
    warm = {(r["ckpt"], r["tp"], r["method"]): r["seconds"] for r in rows if not r["cold"]}
    extra = counts["many-small"] - counts["few-large"]
    scale = total["many-small"] / total["few-large"]
    print(
        f"\nPer-tensor cost (warm; {counts['few-large']} against {counts['many-small']} "
        f"tensors; us/tensor = (many-small s - few-large s x {scale:.3f} bytes) / {extra})"
    )
    head = f"{'TP':>2} {'method':<21} | {'few-large s':>11} {'many-small s':>12} | {'us/tensor':>9}"
    print(head + "\n" + "-" * len(head))
    for (ckpt, tp, method), few in warm.items():
        many = warm.get(("many-small", tp, method))
        if ckpt != "few-large" or many is None or method.startswith("raw"):
            continue
        per_tensor = (many - few * scale) / extra * 1e6
        print(f"{tp:>2} {method:<21} | {few:>11.2f} {many:>12.2f} | {per_tensor:>9.1f}")


RESHARD_METHODS = [  # (label, extra spec, which directory: the save at M, at N, or HF)
    ("resharded", {"load_format": "sharded_state"}, "src"),
    ("sharded_state", {"load_format": "sharded_state"}, "same"),
    ("sharded_state mmap=0", {"load_format": "sharded_state", "mmap": False}, "same"),
    ("default", {"load_format": "auto"}, "hf"),
]
RESHARD_GOAL = 1.5  # resharded s/GB read within this of the same-TP threaded read's


def measure_reshard(
    hf: str, sharded: dict[int, str], src_tp: int, tps: list[int], repeats: int
) -> dict[tuple[int, str], list[dict]]:
    """Warm loads at each TP size N of ``tps`` of the save at ``src_tp`` (resharded),
    against the save at N (mapped and read) and the HF files at N, the methods in turn
    each round. Per run: seconds, and per rank the loader's bytes and ``rchar``."""
    runs: dict[tuple[int, str], list[dict]] = {}
    for _ in range(repeats):
        for tp in tps:
            for name, extra, where in RESHARD_METHODS:
                model = {"src": sharded[src_tp], "same": sharded[tp], "hf": hf}[where]
                warm(weight_files(model))
                res = run_ranks("loader", tp, model=model, **extra)
                progress(f"reshard {src_tp}->{tp} warm {name}: {span(res):.2f} s")
                runs.setdefault((tp, name), []).append(
                    dict(
                        seconds=span(res),
                        loaded=[r["loaded"] for r in res],
                        rchar=[r["rchar"] for r in res],
                    )  # fmt: skip
                )
    return runs


def _per_gb(run: dict) -> float:
    """Seconds per GB read (all ranks' bytes)."""
    return run["seconds"] / (sum(run["loaded"]) / 1e9)


def print_reshard_table(runs: dict[tuple[int, str], list[dict]], src_tp: int) -> None:
    print(
        f"\nResharded load: saved at TP={src_tp}, loaded at TP=N (warm, median of "
        f"{len(next(iter(runs.values())))} runs; seconds: first rank start to last rank "
        "done; GB read: the loaders' count over all ranks (mapped bytes for sharded_state);"
        "\nvs mmap=0: (s per GB read) / (same-TP sharded_state mmap=0's s per GB read), "
        f"the median of the per-round ratios; goal <= {RESHARD_GOAL}x)"
    )
    head = (f"{'N':>2} {'method':<21} {'from':<9} | {'s':>6} {'GB read':>7} {'GB/s':>6} | "
            f"{'MB read/rank':>12} {'rchar MB/rank':>13} | {'vs mmap=0':>9}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for tp in sorted({tp for tp, _ in runs}):
        base = runs[(tp, "sharded_state mmap=0")]
        for name, _, where in RESHARD_METHODS:
            each = runs[(tp, name)]
            r = sorted(each, key=lambda x: x["seconds"])[len(each) // 2]
            gb = sum(r["loaded"]) / 1e9
            ratios = sorted(_per_gb(a) / _per_gb(b) for a, b in zip(each, base))
            source = {"src": f"TP={src_tp}", "same": f"TP={tp}", "hf": "HF"}[where]
            ratio = ratios[len(ratios) // 2]
            print(f"{tp:>2} {name:<21} {source:<9} | {r['seconds']:>6.2f} {gb:>7.2f} "
                  f"{gb / r['seconds']:>6.2f} | {max(r['loaded']) / 1e6:>12.0f} "
                  f"{max(r['rchar']) / 1e6:>13.0f} | {ratio:>8.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=float, default=2.0, help="checkpoint size in GB (bf16)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP sizes")
    parser.add_argument(
        "--num-tensors", type=int, default=None,
        help="also a checkpoint of the same size, about this many tensors",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="warm loads run this many times, in turn; the table shows the median",
    )  # fmt: skip
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up table")
    parser.add_argument(
        "--reshard-from", type=int, default=2,
        help="the resharded section loads a save at this TP size at every other --tp",
    )  # fmt: skip
    parser.add_argument(
        "--only", choices=["reshard"], default=None,
        help="run only this section (reshard: the resharded load; no save/load tables)",
    )  # fmt: skip
    parser.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--rank-task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_task:
        spec = json.loads(args.rank_task)
        if spec["task"] == "startup":
            print("RESULT " + json.dumps(task_startup(spec)), flush=True)
        else:
            rank_task(spec)
        return

    import torch

    from vllm.entrypoints.save_sharded_state import copy_metadata_files

    print(f"Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} "
          f"cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
          f"torch {torch.__version__}")  # fmt: skip
    only_reshard = args.only == "reshard"
    reshard_tps = [tp for tp in args.tp if tp != args.reshard_from]
    shapes = {"few-large": llama_shape(args.size, None)}
    if args.num_tensors:
        shapes["many-small"] = llama_shape(args.size, args.num_tensors)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        load_rows, save_rows, total, tensor_counts = [], [], {}, {}
        reshard_runs: dict[tuple[int, str], list[dict]] = {}
        for label, shape in shapes.items():
            hf = os.path.join(tmp, f"{label}-hf")
            build_checkpoint(hf, shape)
            total[label] = sum(os.path.getsize(f) for f in weight_files(hf))
            tensor_counts[label] = 9 * shape["layers"] + 3
            print(
                f"{label}: Llama hidden {shape['hidden']}, {shape['layers']} layers, "
                f"{tensor_counts[label]} tensors, {total[label] / 1e9:.2f} GB bfloat16"
            )
            sharded = {}
            resharding = label == "few-large" and bool(reshard_tps)
            save_tps = sorted(set(args.tp) | ({args.reshard_from} if resharding else set()))
            for tp in save_tps:
                sharded[tp] = os.path.join(tmp, f"{label}-tp{tp}")
                scratch = os.path.join(tmp, "scratch")
                untimed = only_reshard or tp not in args.tp
                res = run_ranks("save", tp, model=hf, out=sharded[tp], scratch=scratch,
                                untimed=untimed)  # fmt: skip
                progress(f"{label} TP={tp} saved")
                copy_metadata_files(hf, sharded[tp])
                if not untimed:
                    save_rows.append((label, tp, res))
            if not only_reshard:
                load_rows += measure_loads(label, hf, sharded, args.tp, False, args.repeats)
                if not args.no_cold:
                    load_rows += measure_loads(label, hf, sharded, args.tp, True, 1)
            if resharding:
                reshard_runs = measure_reshard(
                    hf, sharded, args.reshard_from, reshard_tps, args.repeats
                )
            shutil.rmtree(hf)
            for d in sharded.values():
                shutil.rmtree(d)

        if only_reshard:
            print_reshard_table(reshard_runs, args.reshard_from)
            return
        print(
            "\nSave (each rank writes its own state; GB/s over all ranks; fsync included; "
            f"the fastest of {SAVE_REPEATS} runs; save_sharded_state into an empty directory)"
        )
        head = (f"{'checkpoint':<12} {'TP':>2} | {'raw write':>14} | {'write_file':>14} | "
                f"{'+CRC-32':>14} {'CRC cost':>8} | {'save_sharded_state':>19}")  # fmt: skip
        print(head + "\n" + "-" * len(head))
        for label, tp, res in save_rows:
            gb = sum(r["bytes"] for r in res) / 1e9
            keys = ("raw", "write_file", "write_file+crc", "save_sharded_state")
            s = {k: min(span([r[k][i] for r in res]) for i in range(SAVE_REPEATS)) for k in keys}
            cells = [f"{gb / s[k]:>5.2f} GB/s {s['raw'] / s[k]:>4.2f}x" for k in keys]
            crc_cost = s["write_file+crc"] / s["write_file"] - 1
            print(f"{label:<12} {tp:>2} | {cells[0]:>14} | {cells[1]} | {cells[2]} "
                  f"{crc_cost:>+8.0%} | {cells[3]:>19}")  # fmt: skip

        print(
            f"\nLoad (warm: median of {args.repeats} runs, cold: one run; vs raw: raw seconds / "
            "method seconds, warm against warm raw, cold against cold raw;\npeak RSS/params: "
            "the largest rank's (peak RSS while loading - RSS before the model was built) / its "
            "parameter bytes)"
        )
        print_load_table(load_rows, total)
        print_paired(load_rows, "default", "upstream loop")
        if len(tensor_counts) == 2:
            print_tensor_cost(load_rows, tensor_counts, total)
        if reshard_runs:
            print_reshard_table(reshard_runs, args.reshard_from)

        if not args.no_startup:
            startup_table(tmp, [tp for tp in args.tp if tp <= 2])


def startup_table(tmp: str, tps: list[int]) -> None:
    from vllm.entrypoints.save_sharded_state import copy_metadata_files
    from vllm.testing import make_model

    path = make_model("llama", os.path.join(tmp, "startup-hf"), dtype="bfloat16", init_std=0.02,
                      **STARTUP_SHAPE)  # fmt: skip
    params = sum(os.path.getsize(f) for f in weight_files(path)) / 2
    print(
        f"\nStart-up: LLM(...) to ready, {params / 1e6:.0f}M-parameter bfloat16 Llama, warm "
        "page cache, fresh process each; no warm-up or compilation step exists to time"
    )
    cols = ["imports", "config", "tokenizer", "workers", "load", "kv_cache", "ready"]
    head = (f"{'TP':>2} {'load_format':<14} | " + " ".join(f"{c:>9}" for c in cols)
            + f" | {'+imports':>8}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for tp in tps:
        sharded = os.path.join(tmp, f"startup-tp{tp}")
        run_ranks("save", tp, model=path, out=sharded, scratch=os.path.join(tmp, "scratch"))
        copy_metadata_files(path, sharded)
        for load_format, model in [("auto", path), ("sharded_state", sharded)]:
            warm(weight_files(model))
            spec = json.dumps(dict(task="startup", tp=tp, model=model, load_format=load_format))
            out = subprocess.run([sys.executable, __file__, "--rank-task", spec],
                                 capture_output=True, text=True)  # fmt: skip
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"start-up run failed:\n{(out.stdout + out.stderr)[-4000:]}")
            t = json.loads(lines[-1][7:])
            print(f"{tp:>2} {load_format:<14} | " + " ".join(f"{t.get(c, 0.0):>9.2f}" for c in cols)
                  + f" | {t['imports'] + t['ready']:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
