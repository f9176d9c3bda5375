"""Logging set up once for the ``vllm`` namespace, upstream's format."""

import logging
import os
import sys

_FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
_root = logging.getLogger("vllm")
if not _root.handlers:
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
    _root.addHandler(_handler)
    _root.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    _root.propagate = False


def init_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
