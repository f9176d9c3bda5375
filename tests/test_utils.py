"""Helpers in vllm.utils that the engine relies on for CPU memory behaviour."""

import os
import sys

import pytest
import torch

from vllm.utils import advise_huge_pages

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _anon_huge_kib(addr: int) -> int:
    """AnonHugePages of the mapping that holds ``addr`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not os.path.exists(THP)
    or "[never]" in open(THP).read(),
    reason="transparent huge pages are not available on this system",
)
def test_kv_cache_sized_tensor_gets_huge_pages() -> None:
    t = torch.empty(64 << 20, dtype=torch.uint8)
    assert advise_huge_pages(t)
    t.fill_(7)  # fault the pages in
    assert _anon_huge_kib(t.data_ptr() + (32 << 20)) >= 2048
    assert int(t.sum()) == 7 * (64 << 20)  # the tensor still holds what was written


def test_tensors_without_a_whole_huge_page_are_left_alone() -> None:
    assert not advise_huge_pages(torch.empty(1000))
    assert not advise_huge_pages(torch.empty(0))
