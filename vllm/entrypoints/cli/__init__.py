"""The ``vllm`` command line (``vllm <subcommand> ...``)."""
