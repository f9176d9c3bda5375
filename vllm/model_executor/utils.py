"""Helpers shared by layers and loaders for parameters and lazily-read checkpoint tensors."""

from __future__ import annotations

from typing import Any

import torch

from vllm.model_executor.layers.shard_spec import get_shard_spec

# A checkpoint tensor: a real tensor, or a lazy slice that reads from disk only the part a
# rank asks for (``model_loader.safetensors.slices.TensorSlice``, safetensors' ``get_slice``,
# ``model_loader.gguf.tensor.GGUFTensor``).
LoadedWeight = Any


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"Parameter already has attribute {key!r}")
        setattr(param, key, value)


def get_shard_dim(param: torch.Tensor) -> int | None:
    """The dimension tensor-parallel ranks split ``param`` along; None when replicated.

    What the layer that made ``param`` stated in its ``shard_spec``.
    """
    return get_shard_spec(param).dim


def weight_shape(w: LoadedWeight) -> tuple[int, ...]:
    return tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w.get_shape())


def check_size(w: LoadedWeight, dim: int, full: int) -> None:
    """Refuse a checkpoint tensor whose size along ``dim`` is not ``full``."""
    if weight_shape(w)[dim] != full:
        raise ValueError(
            f"Shape mismatch: the checkpoint has {weight_shape(w)}, the model expects size "
            f"{full} along dimension {dim} (before it is split across ranks)."
        )


def narrow_weight(
    w: LoadedWeight, dim: int, start: int, length: int, full: int | None = None
) -> LoadedWeight:
    """``w.narrow(dim, start, length)`` that reads only that range from a lazy slice.

    ``full``: the size ``w`` must have along ``dim`` (the whole tensor a rank takes its
    slice of); a checkpoint tensor of another size is refused, not sliced anyway.
    """
    if full is not None:
        check_size(w, dim, full)
    if isinstance(w, torch.Tensor) or hasattr(w, "narrow"):
        return w.narrow(dim, start, length)
    index = [slice(None)] * len(weight_shape(w))
    index[dim] = slice(start, start + length)
    return w[tuple(index)]


def narrow_by_ranges(w: Any, index: Any) -> Any:
    """``w[index]`` for a lazy slice: ``index`` is ranges (``start:stop``, one per leading
    dimension, an optional trailing ``...``), applied as ``narrow``s; returns the view."""
    if not isinstance(index, tuple):
        index = (index,)
    if index and index[-1] is Ellipsis:
        index = index[:-1]
    for dim, s in enumerate(index):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError(f"{type(w).__name__} takes ranges (start:stop), got {index!r}.")
        start, stop, _ = s.indices(w.shape[dim])
        w = w.narrow(dim, start, max(0, stop - start))
    return w


def materialize(w: LoadedWeight) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w
    if len(weight_shape(w)) == 0:
        return w[()]
    return w[:]


def copy_weight(dst: torch.Tensor, w: LoadedWeight, name: str = "") -> None:
    """Copy a checkpoint tensor into ``dst`` after checking the shape and dtype.

    Only float-to-float casts happen implicitly: an integer tensor for a float parameter
    (or the reverse) is a different kind of data, not a precision.
    """
    shape = weight_shape(w)
    if tuple(dst.shape) != shape:
        raise ValueError(
            f"Shape mismatch{' for ' + name if name else ''}: the checkpoint has {shape}, "
            f"the model expects {tuple(dst.shape)}."
        )
    src_dtype = getattr(w, "dtype", None)
    if (
        isinstance(src_dtype, torch.dtype)
        and src_dtype != dst.dtype
        and not (src_dtype.is_floating_point and dst.dtype.is_floating_point)
    ):
        raise ValueError(
            f"Dtype mismatch{' for ' + name if name else ''}: the checkpoint stores "
            f"{src_dtype}, the model expects {dst.dtype}; only float-to-float casts are "
            "done when loading."
        )
    if hasattr(w, "reads_into") and w.reads_into(dst):
        w.read_into(dst)  # straight from the file into the parameter (see TensorSlice)
    else:
        dst.copy_(materialize(w))


def default_weight_loader(param: torch.Tensor, loaded_weight: LoadedWeight) -> None:
    """Loader for replicated parameters: the whole tensor, shape checked."""
    copy_weight(param.data, loaded_weight)
