"""One strictness check for every load format and the saver, with one message format.

A checkpoint that does not fill the model exactly is refused, naming every missing key,
every key the model does not have, and every tensor whose shape or dtype differs (with
the file that holds it), rather than running with uninitialised or misplaced weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm.model_executor.model_loader.safetensors.format import dtype_name

# (shape, dtype) of a tensor; None where only the name is known (a loaded-names set).
Spec = tuple[tuple[int, ...], torch.dtype] | None

_MAX_MISMATCHES = 5  # shape/dtype mismatches spelled out in one message


def list_some(names: list[str], limit: int = 20) -> str:
    """The first ``limit`` names, comma-separated, and how many there are in all."""
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state(
    source: str,
    expected: Mapping[str, Spec],
    found: Mapping[str, Spec],
    *,
    files: Mapping[str, str] | None = None,
    hint: str = "",
    prefix: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error`` unless ``found`` (what the checkpoint holds or filled) has exactly
    the keys of ``expected`` (what the model holds), with the same shape and dtype where
    both give them.

    ``source`` names the checkpoint in the message; ``files`` maps a found key to the
    file holding it; ``prefix`` and ``hint`` go before and after the problems."""
    if found == expected:  # the usual case, compared without a Python loop
        return
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    mismatches = []
    for name, spec in found.items():
        want = expected.get(name)
        if spec is None or want is None or spec == want:
            continue
        where = files.get(name, source) if files else source
        if spec[0] != want[0]:
            mismatches.append(
                f"Shape mismatch for {name} in {where}: the file holds {list(spec[0])}, the "
                f"model expects {list(want[0])}"
            )
        if spec[1] != want[1]:
            mismatches.append(
                f"Dtype mismatch for {name} in {where}: the file holds {dtype_name(spec[1])}, "
                f"the model expects {dtype_name(want[1])}"
            )
    if not (missing or unexpected or mismatches):
        return
    problems = []
    if missing:
        problems.append(
            f"Missing keys in {source}, not initialized from checkpoint: {list_some(missing)}."
        )
    if unexpected:
        named = [f"{name} (in {files[name]})" if files else name for name in unexpected]
        problems.append(
            f"Unexpected keys in {source}, which the model does not have: {list_some(named)}."
        )
    if mismatches:
        more = len(mismatches) - _MAX_MISMATCHES
        tail = f"; ... ({len(mismatches)} mismatches in all)" if more > 0 else ""
        problems.append("; ".join(mismatches[:_MAX_MISMATCHES]) + tail + ".")
    raise error(" ".join([prefix + problems[0], *problems[1:], hint]).rstrip())
