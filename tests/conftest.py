import os

# Keep tests on the CPU and small: the KV cache budget is a few hundred MiB per engine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "0.25")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
