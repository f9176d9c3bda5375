"""Which tensors of a state dict hold distinct memory, and what a freshly built model holds.

Shared by the model construction in ``loader.py`` and the sharded-state loader, which
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
            continue
        group = [(key, t, *_byte_span(t)) for key, t in members]
        for key, t, a, b in group:
            for key2, t2, a2, b2 in group:
                if key2 == key or not t2.is_contiguous() or a < a2 or b2 < b:
                    continue  # t2 does not cover t
                if a2 < a or b < b2 or not t.is_contiguous() or key2 < key:
                    break  # t2 covers t and is the one kept
            else:
                kept.add(key)
    return {k: t for k, t in tensors.items() if k in kept}


def state_schema(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every distinct tensor of ``model.state_dict()``."""
    state = filter_subtensors(model.state_dict())
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def record_initial_state(model: nn.Module) -> None:
    """Remember what the freshly built ``model`` holds: a sharded-state load of this model
    asks for exactly that, so ``save_sharded_state`` checks its files against it."""
    object.__setattr__(model, INITIAL_STATE_ATTR, state_schema(model))
