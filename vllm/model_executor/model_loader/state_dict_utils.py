"""Which tensors of a state dict hold distinct memory, and what a freshly built model holds.

Shared by the model construction in ``base_loader.py`` and the sharded-state loader, which
must agree on both.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

# Attribute set on a model by ``record_initial_state``.
INITIAL_STATE_ATTR = "_initial_state_schema"


def storage_id(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    if t.device.type == "meta":  # every meta storage has data_ptr 0: tell them apart by identity
        return (t.device, storage._cdata)
    return (t.device, storage.data_ptr())


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that ``t``'s elements occupy (strides >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def filter_subtensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one tensor per piece of memory: drop tensors another tensor covers.

    Among tensors sharing a storage, a tensor is dropped when a contiguous tensor spans
    strictly more bytes, or spans the same bytes and either has a smaller key (so tied
    weights keep the smaller name, e.g. ``lm_head.weight``) or the dropped tensor is not
    contiguous. Empty tensors hold no bytes and are dropped. The input order is kept.
    (Upstream vLLM's ``ShardedStateLoader._filter_subtensors`` rules.)
    """
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for key, t in tensors.items():
        if t.is_mkldnn:  # a weight packed for the CPU owns its (opaque) memory
            groups[("mkldnn", id(t))].append((key, t))
        elif t.numel():
            groups[storage_id(t)].append((key, t))
    kept: set[str] = set()
    for members in groups.values():
        if len(members) == 1:  # the common case: a tensor alone in its storage
            kept.add(members[0][0])
        else:  # e.g. a whole model mapped from one file by the sharded-state loader
            kept.update(_uncovered(members))
    return {k: t for k, t in tensors.items() if k in kept}


def _uncovered(members: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Keys of the tensors of one storage that no other tensor covers (rules above).

    One sweep over the tensors sorted by their first byte, so a storage that holds
    thousands of tensors (a mapped checkpoint file) costs n log n, not n^2: ``reach`` is
    the furthest end of a contiguous tensor that starts before the current start, so a
    tensor ending at or before it is covered by a strictly larger span.
    """
    by_start: dict[int, list[tuple[str, int, bool]]] = defaultdict(list)
    for key, t in members:
        start, end = _byte_span(t)
        by_start[start].append((key, end, t.is_contiguous()))
    kept: list[str] = []
    reach = -1
    for start in sorted(by_start):
        here = by_start[start]
        # The smallest key among the contiguous tensors of each exact span at this start.
        first: dict[int, str] = {}
        for key, end, contiguous in here:
            if contiguous and (end not in first or key < first[end]):
                first[end] = key
        longest = max(first, default=-1)
        for key, end, _ in here:
            if reach >= end or longest > end:
                continue  # covered by a contiguous tensor spanning strictly more
            if end in first and first[end] != key:
                continue  # same bytes: the contiguous one with the smallest key is kept
            kept.append(key)
        reach = max(reach, longest)
    return kept


def state_schema(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every distinct tensor of ``model.state_dict()`` (``state``: its
    ``filter_subtensors``, where the caller has it)."""
    if state is None:
        state = filter_subtensors(model.state_dict())
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def record_initial_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    """Remember what the freshly built ``model`` holds: a sharded-state load of this model
    asks for exactly that, so ``save_sharded_state`` checks its files against it."""
    object.__setattr__(model, INITIAL_STATE_ATTR, state_schema(model, state))
