"""One worker per tensor-parallel rank: device, model, KV cache, and step execution."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vllm.attention import Attention
from vllm.config import VllmConfig
from vllm.distributed import init_distributed_environment
from vllm.logger import init_logger
from vllm.sequence import ModelRunnerOutput, SchedulerOutput
from vllm.utils import advise_huge_pages, process_memory, tune_cpu_malloc
from vllm.worker.model_runner import ModelRunner

logger = init_logger(__name__)


@dataclass
class LoadStats:
    """What loading the model cost one rank."""

    rank: int
    seconds: float  # the whole load: build the model, read the weights, post-process
    bytes_read: int  # checkpoint bytes read (or memory-mapped) by the loader
    peak_rss_growth: int  # bytes


class Worker:
    def __init__(
        self, vllm_config: VllmConfig, rank: int = 0, distributed_init_method: str | None = None
    ):
        self.vllm_config = vllm_config
        self.rank = rank
        self.distributed_init_method = distributed_init_method
        self.kv_cache: torch.Tensor | None = None
        self.model_runner: ModelRunner | None = None
        self.load_memory: tuple[int, int] | None = None
        self.load_stats: LoadStats | None = None

    def init_device(self) -> None:
        device_config = self.vllm_config.device_config
        world_size = self.vllm_config.parallel_config.world_size
        if device_config.device == "cuda":
            self.device = torch.device(f"cuda:{self.rank % max(1, torch.cuda.device_count())}")
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
            tune_cpu_malloc()
        init_distributed_environment(world_size, self.rank, self.distributed_init_method, backend)
        torch.manual_seed(self.vllm_config.model_config.seed)
        self.model_runner = ModelRunner(self.vllm_config, self.device, is_driver=self.rank == 0)

    def load_model(self) -> None:
        start = time.perf_counter()
        rss_before, _ = process_memory()
        self.model_runner.load_model()
        seconds = time.perf_counter() - start
        _, peak = process_memory()
        # (RSS before, peak RSS so far) in bytes; in a fresh worker process the peak is
        # set by loading, so the difference is what loading cost this rank.
        self.load_memory = (rss_before, peak)
        self.load_stats = LoadStats(
            self.rank, seconds, self.model_runner.bytes_read, peak - rss_before
        )
        logger.info(
            "Rank %d loaded the model in %.2f s; peak RSS %.2f GiB (+%.2f GiB while loading)",
            self.rank,
            seconds,
            peak / (1 << 30),
            (peak - rss_before) / (1 << 30),
        )

    def get_load_stats(self) -> LoadStats | None:
        """What loading the model cost this rank (``llm.collective_rpc("get_load_stats")``)."""
        return self.load_stats

    @property
    def model(self) -> torch.nn.Module:
        return self.model_runner.model

    def _attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def get_cache_block_size_bytes(self) -> int:
        layers = self._attention_layers()
        block_size = self.vllm_config.cache_config.block_size
        dtype_size = torch.empty((), dtype=self.vllm_config.model_config.dtype).element_size()
        return sum(2 * block_size * a.num_kv_heads * a.head_size * dtype_size for a in layers)

    def determine_num_available_blocks(self) -> int:
        """How many KV blocks this rank can hold; the executor takes the minimum over ranks."""
        cache_config = self.vllm_config.cache_config
        if cache_config.num_gpu_blocks_override is not None:
            return cache_config.num_gpu_blocks_override
        block_bytes = self.get_cache_block_size_bytes()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used_elsewhere = total - free
            budget = total * cache_config.gpu_memory_utilization - used_elsewhere
        else:
            budget = cache_config.cpu_kvcache_space_bytes
        # No point in more blocks than every sequence at full length could use.
        sched = self.vllm_config.scheduler_config
        max_useful = sched.max_num_seqs * -(-sched.max_model_len // cache_config.block_size)
        return max(0, min(int(budget // block_bytes), max_useful))

    def initialize_cache(self, num_blocks: int) -> None:
        """One flat allocation; each attention layer gets a [2, slots, kv_heads, head] view."""
        layers = self._attention_layers()
        block_size = self.vllm_config.cache_config.block_size
        a = layers[0]
        if any((x.num_kv_heads, x.head_size) != (a.num_kv_heads, a.head_size) for x in layers):
            raise NotImplementedError("Layers with different KV shapes are not supported.")
        shape = (len(layers), 2, num_blocks * block_size, a.num_kv_heads, a.head_size)
        dtype = self.vllm_config.model_config.dtype
        if self.device.type == "cpu":
            # Attention reads only slots that were written first, plus slot 0 where
            # batched decodes pad (masked out, but 0 * NaN would still be NaN). Leaving the
            # rest untouched lets the OS fault pages in as the cache fills, instead of
            # zeroing gigabytes at start-up (seconds on the CPU). Huge pages make those
            # faults 512x fewer.
            self.kv_cache = torch.empty(shape, dtype=dtype)
            advise_huge_pages(self.kv_cache)
            self.kv_cache[:, :, 0].zero_()
        else:
            self.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.kv_cache = self.kv_cache[i]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.model_runner.execute_model(scheduler_output)

    def save_sharded_state(
        self, path: str, pattern: str | None = None, max_size: int | None = None
    ) -> None:
        """Write this rank's slice of the model under ``path`` (every rank must call it)."""
        from vllm.model_executor.model_loader.sharded_state.loader import ShardedStateLoader

        ShardedStateLoader.save_model(
            self.model, path, pattern=pattern, max_size=max_size, vllm_config=self.vllm_config
        )
