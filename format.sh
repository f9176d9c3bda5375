#!/usr/bin/env bash
# Lint and format the tree with ruff (configuration in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")"
ruff check --fix vllm tests benchmarks examples
ruff format vllm tests benchmarks examples
