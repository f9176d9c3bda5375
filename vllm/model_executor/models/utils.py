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
    Returns the parameter names loaded; raises on names that match no parameter.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for ckpt_name, weight in weights:
        name = rename(ckpt_name)
        if name is None:
            continue
        for param_name, shard_name, shard_id in stacked_params_mapping:
            if shard_name not in name:
                continue
            fused = name.replace(shard_name, param_name)
            if fused in params:
                param = params[fused]
                param.weight_loader(param, weight, shard_id)
                loaded.add(fused)
                break
        else:
            if name not in params:
                unexpected.append(ckpt_name)
                continue
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
    if unexpected:
        raise ValueError(
            f"The checkpoint has {len(unexpected)} tensor(s) this model does not expect: "
            f"{', '.join(sorted(unexpected)[:20])}{' ...' if len(unexpected) > 20 else ''}"
        )
    return loaded
