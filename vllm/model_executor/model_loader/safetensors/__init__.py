"""Safetensors files read and written directly: ``format`` (headers, dtypes, errors),
``writer``, ``reader`` (the one read engine), ``slices`` (lazy slices of Hugging Face
files), ``staging`` (reads bound for CUDA) and ``mapping`` (memory-mapped tensors)."""
