"""Helpers that read model configs and tokenizers the way transformers stores them."""
