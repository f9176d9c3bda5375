"""Helpers in vllm.utils that the engine relies on for CPU memory behaviour."""

import os
import sys

import pytest
import torch

from vllm.utils import advise_huge_pages

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE = 2 << 20


def _mapping_of(addr: int) -> tuple[int, int, set[str]]:
    """(start, end, VmFlags) of this process's mapping that holds ``addr`` (smaps)."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = (lo, hi) if lo <= addr < hi else None
            elif found and head == "VmFlags:":
                return found[0], found[1], set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not os.path.exists(THP)
    or "[never]" in open(THP).read(),
    reason="transparent huge pages are not available on this system",
)
def test_kv_cache_sized_tensor_is_advised_for_huge_pages() -> None:
    # Whether the kernel then hands out 2 MiB pages depends on its free memory and
    # defrag setting (and on malloc reusing already-faulted heap pages), so the test
    # checks what the engine controls: every whole huge page of the tensor is marked
    # MADV_HUGEPAGE ("hg" in VmFlags). Neighbouring memory advised earlier in this
    # process may share the mapping, so only coverage is checked.
    t = torch.empty(64 << 20, dtype=torch.uint8)
    begin, end = t.data_ptr(), t.data_ptr() + t.numel()
    assert advise_huge_pages(t)
    lo, hi, flags = _mapping_of(begin + (32 << 20))
    assert "hg" in flags
    assert lo <= -(-begin // HUGE) * HUGE and hi >= end // HUGE * HUGE
    t.fill_(7)
    assert int(t.sum()) == 7 * (64 << 20)  # the tensor still holds what was written


def test_tensors_without_a_whole_huge_page_are_left_alone() -> None:
    assert not advise_huge_pages(torch.empty(1000))
    assert not advise_huge_pages(torch.empty(0))
