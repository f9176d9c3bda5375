"""Functions the tests run on every rank with ``collective_rpc(fn)`` (importable by name,
so spawned workers can unpickle them)."""

from __future__ import annotations

import hashlib

import torch


def dense_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with weights packed for the CPU (mkldnn) made plain again."""
    return {k: t.to_dense() if t.is_mkldnn else t for k, t in model.state_dict().items()}


def state_digest(worker) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, shape, sha256 of the bytes) for every state_dict entry of this rank."""
    out = {}
    for name, t in dense_state_dict(worker.model).items():
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = (str(t.dtype), tuple(t.shape), hashlib.sha256(data.tobytes()).hexdigest())
    return out


def reshape_param(worker, name: str, rank: int | None = None) -> None:
    """Stand-in for a backend that repacks a weight after loading (changes its shape), on
    ``rank`` only if given."""
    if rank is not None and worker.rank != rank:
        return
    module_name, _, attr = name.rpartition(".")
    module = worker.model.get_submodule(module_name)
    old = getattr(module, attr)
    setattr(module, attr, torch.nn.Parameter(old.data.t().contiguous(), requires_grad=False))


def state_nbytes(worker) -> int:
    """Bytes of this rank's distinct state tensors (what a load of its slices must read)."""
    seen, total = set(), 0
    for t in dense_state_dict(worker.model).values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
