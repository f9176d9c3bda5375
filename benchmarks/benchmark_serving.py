"""Online serving benchmark: an OpenAI-compatible server's latency and throughput.

The client streams ``POST /v1/completions`` requests whose prompts are random token ids
(``ignore_eos``, greedy, ``stream_options.include_usage``) at a fixed request rate
(Poisson arrivals) and/or a fixed number in flight, and reports per-request time to first
token (TTFT: to the first chunk that carries tokens, whose text may be empty, as upstream's
benchmark counts it), time per output token (TPOT), the gaps between streamed chunks (ITL),
how many tokens each chunk carried (1 for a server that streams every token) and the
throughput of the run. It talks plain HTTP, so it measures any vLLM-compatible server.

Without ``--base-url`` it runs the whole comparison: it builds a random ~100M Llama,
starts ``vllm serve`` on it, runs the client at each ``--concurrency``, stops the server,
then times the offline engine (``LLM.generate``, and ``LLMEngine.step`` for per-token
latency) on the same prompts in a separate process, and prints served against offline.

    python benchmarks/benchmark_serving.py                          # 1, 8, 32 in flight
    python benchmarks/benchmark_serving.py --concurrency 1 4 --num-prompts 4 --output-len 16
    python benchmarks/benchmark_serving.py --base-url http://127.0.0.1:8000 \\
        --max-concurrency 8 --num-prompts 32                        # a running server
    python benchmarks/benchmark_serving.py --base-url http://127.0.0.1:8000 --request-rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
from cpu_info import cpu_name

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.engine.llm_engine import LLMEngine

NAN = float("nan")


@dataclass
class RequestResult:
    prompt_len: int
    error: str = ""
    ttft: float = NAN
    e2e: float = NAN
    output_tokens: int = 0
    usage_missing: bool = False
    chunks: int = 0
    itl: list[float] = field(default_factory=list)


@dataclass
class Summary:
    completed: int
    failed: int
    duration: float
    req_s: float
    out_tok_s: float
    total_tok_s: float
    ttft: tuple[float, float, float]  # mean, p50, p99 in ms
    tpot: tuple[float, float, float]
    itl: tuple[float, float, float]
    e2e: tuple[float, float, float]
    errors: Counter[str]
    usage_missing: int
    tokens_per_chunk: float
    wrong_length: int


def machine_info() -> str:
    import torch

    return f"machine: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def make_prompts(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(input_len)] for _ in range(n)]


class ServerError(Exception):
    pass


async def _stream(client: httpx.AsyncClient, body: dict, res: RequestResult) -> None:
    start = last = time.perf_counter()
    done = False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise ServerError(f"HTTP {resp.status_code}: {text[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk or chunk.get("object") == "error":
                raise ServerError(f"error event: {data[:200]}")
            if chunk.get("choices"):  # new tokens; their text may be empty (a partial character)
                now = time.perf_counter()
                if res.chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last, res.chunks = now, res.chunks + 1
            if chunk.get("usage"):
                res.output_tokens = int(chunk["usage"]["completion_tokens"])
    res.e2e = time.perf_counter() - start
    if not done:
        raise ServerError("the stream ended without 'data: [DONE]'")
    if res.chunks == 0:
        raise ServerError("no chunk with choices")
    if res.output_tokens == 0:  # no usage chunk: count the chunks instead
        res.output_tokens, res.usage_missing = res.chunks, True


async def send_request(
    client: httpx.AsyncClient, model: str, ids: list[int], output_len: int, timeout: float
) -> RequestResult:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,  # vLLM's extension: every request generates output_len tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = RequestResult(prompt_len=len(ids))
    try:
        await asyncio.wait_for(_stream(client, body, res), timeout)
    except asyncio.TimeoutError:
        res.error = f"no complete response within {timeout:g} s"
    except Exception as e:  # every failure is counted and reported, never dropped
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_client(
    url: str, model: str, prompts: list[list[int]], args: argparse.Namespace, limit: int | None
) -> tuple[list[RequestResult], float]:
    """Send every prompt once, at most ``limit`` in flight; return the results and duration."""
    gate = asyncio.Semaphore(limit or len(prompts))
    rng = random.Random(args.seed)
    timeout = args.request_timeout
    limits = httpx.Limits(max_connections=limit or len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(ids: list[int]) -> RequestResult:
            async with gate:
                return await send_request(client, model, ids, args.output_len, timeout)

        start = time.perf_counter()
        tasks = []
        for ids in prompts:
            tasks.append(asyncio.create_task(one(ids)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def ms_stats(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return NAN, NAN, NAN
    s = sorted(v * 1000 for v in values)

    def pct(q: float) -> float:  # linear interpolation between closest ranks
        pos = (len(s) - 1) * q
        lo = int(pos)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)

    return statistics.fmean(s), pct(0.5), pct(0.99)


def summarize(results: list[RequestResult], duration: float, output_len: int) -> Summary:
    ok = [r for r in results if not r.error]
    out = sum(r.output_tokens for r in ok)
    return Summary(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration=duration,
        req_s=len(ok) / duration,
        out_tok_s=out / duration,
        total_tok_s=(out + sum(r.prompt_len for r in ok)) / duration,
        ttft=ms_stats([r.ttft for r in ok]),
        tpot=ms_stats(
            [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
        ),
        itl=ms_stats([gap for r in ok for gap in r.itl]),
        e2e=ms_stats([r.e2e for r in ok]),
        errors=Counter(r.error for r in results if r.error),
        usage_missing=sum(r.usage_missing for r in ok),
        tokens_per_chunk=out / max(1, sum(r.chunks for r in ok)),
        wrong_length=sum(r.output_tokens != output_len for r in ok),
    )


def print_summary(title: str, s: Summary) -> None:
    print(f"\n{f' {title} ':=^64}")
    rows = [
        ("Completed / failed requests", f"{s.completed} / {s.failed}"),
        ("Duration (s)", f"{s.duration:.2f}"),
        ("Request throughput (req/s)", f"{s.req_s:.2f}"),
        ("Output token throughput (tok/s)", f"{s.out_tok_s:.1f}"),
        ("Total token throughput (tok/s)", f"{s.total_tok_s:.1f}"),
        ("Output tokens per streamed chunk", f"{s.tokens_per_chunk:.2f}"),
    ]
    for label, value in rows:
        print(f"{label:<40}{value:>24}")
    print(f"{'(ms)':<34}{'mean':>10}{'p50':>10}{'p99':>10}")
    latencies = {
        "Time to first token": s.ttft,
        "Time per output token": s.tpot,
        "Inter-token latency": s.itl,
        "End-to-end latency": s.e2e,
    }
    for label, st in latencies.items():
        print(f"{label:<34}" + "".join(f"{v:>10.2f}" for v in st))
    for error, n in s.errors.most_common():
        print(f"FAILED x{n}: {error}")
    if s.usage_missing:
        print(f"{s.usage_missing} requests had no usage chunk: output tokens = chunks")
    if s.wrong_length:
        print(f"{s.wrong_length} completed requests did not return exactly --output-len tokens")


def first_model_id(base_url: str) -> str:
    try:
        resp = httpx.get(f"{base_url}/v1/models", timeout=30)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise SystemExit(f"GET {base_url}/v1/models gave no model id: {e!r}") from e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model_dir: str, log_path: str, timeout: float) -> Iterator[str]:
    """Run ``vllm serve`` in its own process group; yield its URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--disable-log-requests"]
    print("starting:", " ".join(cmd), f"(log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 200 from /health in {timeout:g} s:\n{_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def _tail(path: str, lines: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


# The offline engines of the worker process, one per concurrency, kept across rounds.
_OFFLINE_LLMS: dict = {}


def offline_level(model_dir: str, c: int, prompts: list[list[int]], output_len: int) -> dict:
    """Offline output tok/s of ``LLM(max_num_seqs=c).generate`` on ``prompts``; at c=1 also
    TTFT and TPOT from single-request ``LLMEngine.step`` calls. Runs in the worker process."""
    import torch

    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    if c not in _OFFLINE_LLMS:
        llm = LLM(model=model_dir, max_num_seqs=c)
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0]}], warm, use_tqdm=False)
        _OFFLINE_LLMS[c] = llm
    llm = _OFFLINE_LLMS[c]
    out: dict = {"threads": torch.get_num_threads()}
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    out["tok_s"] = n_out / (time.perf_counter() - start)
    if c == 1:
        steps = [
            step_times(llm.llm_engine, f"step-{i}", ids, params) for i, ids in enumerate(prompts)
        ]
        out["ttft_ms"] = statistics.fmean(s[0] for s in steps) * 1000
        out["e2e_ms"] = statistics.fmean(sum(s) for s in steps) * 1000
        tpots = [statistics.fmean(s[1:]) for s in steps if len(s) > 1]
        out["tpot_ms"] = statistics.fmean(tpots) * 1000 if tpots else NAN
    return out


def step_times(
    engine: LLMEngine, request_id: str, ids: list[int], params: SamplingParams
) -> list[float]:
    """Seconds of each ``LLMEngine.step`` that one request, alone in the engine, takes."""
    engine.add_request(request_id, {"prompt_token_ids": ids}, params)
    steps = []
    for _ in range((params.max_tokens or 0) + 16):  # bounded: one token per step
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
        if not engine.has_unfinished_requests():
            return steps
    raise RuntimeError(f"request {request_id} did not finish in {len(steps)} steps")


@dataclass
class Pair:
    """One round at one concurrency: served, then offline, back to back."""

    served: Summary
    offline: dict


def full_run(args: argparse.Namespace) -> None:
    """Rounds of (served, offline) at each concurrency, back to back, so that the machine's
    slow spells hit both sides of a ratio. The idle server waits while the offline engine
    (in a worker process of its own) runs."""
    from vllm.testing import LLAMA_100M, make_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.workdir or tmp
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            make_model("llama", model_dir, vocab_size=32000, init_std=0.02, **LLAMA_100M)
        with open(os.path.join(model_dir, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        prompts = {
            c: make_prompts(args.num_prompts or default_num_prompts(c), args.input_len, vocab, i)
            for i, c in enumerate(args.concurrency, start=args.seed)
        }
        pairs: dict[int, list[Pair]] = {c: [] for c in args.concurrency}
        ctx = multiprocessing.get_context("spawn")
        log = os.path.join(model_dir, "server.log")
        with (
            ProcessPoolExecutor(1, mp_context=ctx) as pool,
            serve(model_dir, log, args.server_timeout) as url,
        ):
            model = args.model or first_model_id(url)
            warm_up(url, model, prompts[args.concurrency[0]][0], args)
            for r in range(args.rounds):
                for c, level in prompts.items():
                    served = client_level(args, url, model, level, c, f"round {r + 1}, ")
                    offline = pool.submit(
                        offline_level, model_dir, c, level, args.output_len
                    ).result()
                    print(f"offline: {offline['tok_s']:.1f} output tok/s", flush=True)
                    pairs[c].append(Pair(served, offline))
    print_comparison(args, pairs)


def default_num_prompts(concurrency: int | None) -> int:
    return 32 if concurrency is None else 4 if concurrency == 1 else 2 * concurrency


def warm_up(url: str, model: str, ids: list[int], args: argparse.Namespace) -> None:
    """One request before timing: the server's first request pays one-time costs."""
    (res,), _ = asyncio.run(run_client(url, model, [ids], args, 1))
    if res.error:
        raise SystemExit(f"the warm-up request failed: {res.error}")


def client_level(
    args: argparse.Namespace,
    url: str,
    model: str,
    prompts: list[list[int]],
    c: int | None,
    title: str = "",
) -> Summary:
    cpu = time.process_time()
    results, duration = asyncio.run(run_client(url, model, prompts, args, c))
    cpu = time.process_time() - cpu  # the client's share of the cores it shares with the server
    s = summarize(results, duration, args.output_len)
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
    print_summary(f"{title}concurrency {c or 'unbounded'}, request rate {rate}", s)
    print(
        f"{len(prompts)} prompts of {args.input_len} tokens, {args.output_len} out; "
        f"client CPU {cpu:.2f} s ({cpu / duration:.1%} of one core)",
        flush=True,
    )
    return s


def print_comparison(args: argparse.Namespace, pairs: dict[int, list[Pair]]) -> None:
    med = statistics.median
    print(f"\n{machine_info()}")
    threads = next(iter(pairs.values()))[0].offline["threads"]
    print(
        f"served vs offline, {args.input_len} prompt tokens and {args.output_len} output tokens "
        f"per request, offline torch threads {threads}; medians of {args.rounds} rounds, "
        "ratios paired by round"
    )
    head = (
        f"{'conc':>4}{'ok/fail':>9} |{'served tok/s':>13}{'offline':>9}{'ratio':>7} |"
        f"{'TPOT ms':>9}{'offline':>9}{'ratio':>7} |{'TTFT ms':>9}{'offline':>9} |"
        f"{'ITL p50':>9}{'p99':>8}{'tok/chunk':>10}"
    )
    print(head + "\n" + "-" * len(head))
    ratios: dict[int, list[float]] = {}
    tpot_ratios: list[float] = []
    for c, rounds in pairs.items():
        served = [p.served for p in rounds]
        ok = sum(s.completed for s in served)
        failed = sum(s.failed for s in served)
        ratios[c] = [p.served.out_tok_s / p.offline["tok_s"] for p in rounds]
        off_tpot = off_ttft = NAN
        tpot_ratio = ""
        if c == 1:
            tpot_ratios = [p.served.tpot[0] / p.offline["tpot_ms"] for p in rounds]
            off_tpot = med(p.offline["tpot_ms"] for p in rounds)
            off_ttft = med(p.offline["ttft_ms"] for p in rounds)
            tpot_ratio = f"{med(tpot_ratios):>6.2f}x"
        print(
            f"{c:>4}{f'{ok}/{failed}':>9} |{med(s.out_tok_s for s in served):>13.1f}"
            f"{med(p.offline['tok_s'] for p in rounds):>9.1f}{med(ratios[c]):>6.2f}x |"
            f"{med(s.tpot[0] for s in served):>9.2f}{_opt(off_tpot, 9, '.2f')}"
            f"{tpot_ratio or _opt(NAN, 6, '', 'x')} |{med(s.ttft[0] for s in served):>9.1f}"
            f"{_opt(off_ttft, 9, '.1f')} |{med(s.itl[1] for s in served):>9.2f}"
            f"{med(s.itl[2] for s in served):>8.2f}"
            f"{med(s.tokens_per_chunk for s in served):>10.2f}"
        )
    print("TPOT and TTFT: means per round; offline TPOT/TTFT: one request at a time through")
    print("LLMEngine.step. Ratio of each round:")
    for c, rs in ratios.items():
        print(f"  concurrency {c} tok/s: " + " ".join(f"{r:.2f}x" for r in rs))
    if tpot_ratios:
        print("  concurrency 1 TPOT: " + " ".join(f"{r:.2f}x" for r in tpot_ratios))
    failed = {c: sum(p.served.failed for p in rounds) for c, rounds in pairs.items()}
    if 32 in ratios:
        r = med(ratios[32])
        ok = r >= 0.9 and not failed[32]
        print(
            f"goal: concurrency 32, served output tok/s >= 90% of offline: {r:.1%} "
            f"(median of paired rounds), {failed[32]} failed -> {'PASS' if ok else 'MISS'}"
        )
    else:
        print("goal: concurrency 32 served >= 90% of offline tok/s: not measured in this run")
    if tpot_ratios:
        r = med(tpot_ratios)
        per_token = all(p.served.tokens_per_chunk <= 1.05 for p in pairs[1])
        ok = r <= 1.1 and not failed[1] and per_token
        print(
            f"goal: concurrency 1, served TPOT at most 10% above offline: {r:.2f}x (median of "
            f"paired rounds), {failed[1]} failed -> {'PASS' if ok else 'MISS'}"
        )
        if not per_token:
            print(
                "  not measurable: the server sent more than one token per chunk, so TTFT, "
                "TPOT and ITL time chunks, not tokens"
            )
    else:
        print("goal: concurrency 1 served TPOT at most 10% above offline: not measured in this run")


def _opt(value: float, width: int, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or a dash where it was not measured (NaN)."""
    if math.isnan(value):
        return f"{'-':>{width + len(suffix)}}"
    return f"{value:>{width}{spec}}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    # fmt: off
    add("--base-url", help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8000 "
        "(default: build a model, start `vllm serve` and compare with the offline engine)")
    add("--model", help="model name to send (default: the first id of GET /v1/models)")
    add("--num-prompts", type=int, help="requests per run (default: 4 at concurrency 1, "
        "2x the concurrency otherwise, 32 without a concurrency limit)")
    add("--input-len", type=int, default=128, help="prompt length in tokens (%(default)s)")
    add("--output-len", type=int, default=128, help="tokens generated per request (%(default)s)")
    add("--vocab-size", type=int, default=32000,
        help="prompt ids are drawn from [2, this) (%(default)s; with --base-url, else the "
        "model's vocabulary)")
    add("--request-rate", type=float, default=math.inf,
        help="requests per second, Poisson arrivals (default inf: all at once)")
    add("--max-concurrency", type=int, help="most requests in flight (with --base-url)")
    add("--concurrency", type=int, nargs="+", default=[1, 8, 32],
        help="requests in flight, one run each (without --base-url; %(default)s)")
    add("--rounds", type=int, default=3, help="rounds of served-then-offline runs at each "
        "concurrency, for medians and paired ratios (without --base-url; %(default)s)")
    add("--workdir", help="where the model is built, or reused if it holds a config.json "
        "(default: a temp dir); server.log goes there too")
    add("--seed", type=int, default=0, help="seed of the prompts and arrival times (%(default)s)")
    add("--request-timeout", type=float, default=600,
        help="seconds a request may take (%(default)g)")
    add("--server-timeout", type=float, default=600,
        help="seconds to wait for /health (%(default)g)")
    # fmt: on
    args = parser.parse_args()
    if args.base_url is None:
        full_run(args)
        return
    url = args.base_url.rstrip("/")
    model = args.model or first_model_id(url)
    n = args.num_prompts or default_num_prompts(args.max_concurrency)
    prompts = make_prompts(n, args.input_len, args.vocab_size, args.seed)
    warm_up(url, model, prompts[0], args)
    client_level(args, url, model, prompts, args.max_concurrency)
    print(machine_info())


if __name__ == "__main__":
    main()
