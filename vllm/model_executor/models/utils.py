"""Checkpoint-name mapping shared by the model files."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from vllm.model_executor.utils import LoadedWeight, default_weight_loader

# (fused parameter name, checkpoint name, shard id)
StackedMapping = list[tuple[str, str, str | int]]


def load_weights_by_name(
    model: nn.Module,
    weights: Iterable[tuple[str, LoadedWeight]],
    stacked_params_mapping: StackedMapping = (),
    rename: Callable[[str], str | None] = lambda name: name,
) -> set[str]:
    """Route each checkpoint tensor to its parameter's ``weight_loader``.

    ``rename`` maps a checkpoint name to a parameter name (``None`` skips it: a
    checkpoint entry the model does not need, such as a tied ``lm_head.weight``).
    Returns the parameter names loaded. Raises on names that match no parameter, on a
    fused parameter missing one of its pieces (its rows would stay uninitialised), and
    on a tensor its parameter refuses (shape, dtype), naming the checkpoint tensor.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    # Fused parameter -> the shard ids loaded into it so far.
    fused_shards: dict[str, set[str | int]] = {}
    for ckpt_name, weight in weights:
        name = rename(ckpt_name)
        if name is None:
            continue
        try:
            for param_name, shard_name, shard_id in stacked_params_mapping:
                if shard_name not in name:
                    continue
                fused = name.replace(shard_name, param_name)
                if fused in params:
                    param = params[fused]
                    param.weight_loader(param, weight, shard_id)
                    fused_shards.setdefault(fused, set()).add(shard_id)
                    break
            else:
                if name not in params:
                    unexpected.append(ckpt_name)
                    continue
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
                loaded.add(name)
        except (ValueError, IndexError) as e:  # a shape, dtype or slice the model refuses
            raise ValueError(f"Cannot load checkpoint tensor {ckpt_name!r}: {e}") from e
    if unexpected:
        raise ValueError(
            f"The checkpoint has {len(unexpected)} tensor(s) this model does not expect: "
            f"{', '.join(sorted(unexpected)[:20])}{' ...' if len(unexpected) > 20 else ''}"
        )
    loaded |= _complete_fused(fused_shards, stacked_params_mapping)
    return loaded


def _complete_fused(
    fused_shards: dict[str, set[str | int]], stacked_params_mapping: StackedMapping
) -> set[str]:
    """The fused parameters that got every piece; raises naming the pieces missing."""
    missing = []
    for fused, got in fused_shards.items():
        for param_name, shard_name, shard_id in stacked_params_mapping:
            if param_name in fused and shard_id not in got:
                missing.append(fused.replace(param_name, shard_name))
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} tensor(s) that fused parameters are built "
            f"from: {', '.join(sorted(missing)[:20])}{' ...' if len(missing) > 20 else ''}. "
            "Without them part of each fused weight would stay uninitialised."
        )
    return set(fused_shards)
