"""The sharded-state directory format: file-name patterns and the manifest.

Per rank, files named by a pattern with ``{rank}`` and ``{part}`` (upstream vLLM's default
``model-rank-{rank}-part-{part}.safetensors``); beside them this engine writes a manifest,
``sharded_state.json``, recording the configuration the checkpoint was saved under, every
file's size and CRC-32, and every tensor's dtype, local shape, global shape and shard dim.
"""

from __future__ import annotations

import json
import os
import re
import string
from typing import Any

from vllm.config import VllmConfig
from vllm.model_executor.model_loader.safetensors.format import ShardFileError, dtype_name

DEFAULT_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
MANIFEST_NAME = "sharded_state.json"
FORMAT_VERSION = 1


def validate_pattern(pattern: Any) -> str:
    """Return ``pattern`` if it is a file name with exactly the fields {rank} and {part}."""
    example = "e.g. 'model-rank-{rank}-part-{part}.safetensors'"
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"The sharded-state file pattern must be a string ({example}).")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
        name = pattern.format(rank=0, part=0)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"The sharded-state file pattern {pattern!r} is not a valid format string ({e}); "
            f"{example}."
        ) from e
    if sorted(fields) != ["part", "rank"]:
        raise ValueError(
            f"The sharded-state file pattern {pattern!r} must contain {{rank}} and {{part}} "
            f"once each and no other fields, {example}."
        )
    if os.sep in name or "/" in name or name in (".", ".."):
        raise ValueError(
            f"The sharded-state file pattern {pattern!r} must be a file name, not a path; "
            "the files go in the checkpoint directory."
        )
    return pattern


def pattern_regex(pattern: str, rank: int | None = None) -> re.Pattern[str]:
    """Regex for the file names ``pattern`` gives ``rank`` (any rank when None)."""
    out = []
    for literal, field, spec, conv in string.Formatter().parse(pattern):
        out.append(re.escape(literal))
        if field == "rank" and rank is not None:
            one = "{rank" + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            out.append(re.escape(one.format(rank=rank)))
        elif field is not None:
            out.append(f"(?P<{field}>.+?)")
    return re.compile("".join(out) + r"\Z")


def _natural_key(text: str) -> tuple[int, Any]:
    return (0, int(text)) if text.isdigit() else (1, text)


def describe_pattern(pattern: str, rank: int) -> str:
    try:
        return repr(pattern.format(rank=rank, part="*"))
    except (ValueError, KeyError):
        return f"{pattern!r} with rank={rank}"


def find_rank_files(model_dir: str, pattern: str, rank: int) -> list[str]:
    """The files ``pattern`` names for ``rank`` in ``model_dir``, in part order."""
    regex = pattern_regex(pattern, rank)
    found = []
    for name in os.listdir(model_dir):
        m = regex.match(name)
        if m:
            found.append((_natural_key(m.group("part")), name))
    return [os.path.join(model_dir, name) for _, name in sorted(found)]


def ranks_present(model_dir: str, pattern: str) -> list[str]:
    regex = pattern_regex(pattern)
    ranks = {m.group("rank") for name in os.listdir(model_dir) if (m := regex.match(name))}
    return sorted(ranks, key=_natural_key)


# ---- the manifest -------------------------------------------------------------------------


def read_manifest(model_dir: str) -> dict[str, Any] | None:
    path = os.path.join(model_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
        pattern = validate_pattern(manifest.get("pattern"))
        for name, info in manifest["files"].items():
            if not isinstance(info, dict) or not all(
                isinstance(info.get(key), int) for key in ("rank", "part", "size")
            ):
                raise ValueError(f"bad entry for {name}")
            int(info.get("crc32"), 16)
            # Only the names the pattern gives: never a path out of the directory.
            expected = pattern.format(rank=info["rank"], part=info["part"])
            if name != expected:
                raise ValueError(
                    f"it lists a file {name!r} for rank {info['rank']} part {info['part']}, "
                    f"where its pattern {pattern!r} names {expected!r}"
                )
    except (ValueError, TypeError) as e:
        raise ShardFileError(
            f"{path} is corrupt ({e}); save the checkpoint again, or delete the file to load "
            "without verification."
        ) from e
    return manifest


def engine_config_info(vllm_config: VllmConfig) -> dict[str, Any]:
    mc = vllm_config.model_config
    return {
        "architecture": mc.architecture,
        "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
        "pipeline_parallel_size": vllm_config.parallel_config.pipeline_parallel_size,
        "dtype": dtype_name(mc.dtype),
        "quantization": mc.quantization,
    }


def check_manifest(manifest: dict[str, Any], vllm_config: VllmConfig, model_dir: str) -> None:
    """Refuse a checkpoint saved under a configuration the engine does not run."""
    path = os.path.join(model_dir, MANIFEST_NAME)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this build reads versions up to "
            f"{FORMAT_VERSION}. Upgrade vllm, or save the checkpoint again with this build."
        )
    engine = engine_config_info(vllm_config)
    saved = {key: manifest.get(key) for key in engine}
    no_reshard = "Resharding is not supported yet"
    if saved["architecture"] != engine["architecture"]:
        raise ValueError(
            f"{model_dir} was saved from architecture {saved['architecture']}, but its config "
            f"names {engine['architecture']}. Save the checkpoint again from the right model."
        )
    if saved["tensor_parallel_size"] != engine["tensor_parallel_size"]:
        raise ValueError(
            f"{model_dir} was saved with tensor_parallel_size={saved['tensor_parallel_size']}, "
            f"but the engine runs tensor_parallel_size={engine['tensor_parallel_size']}. "
            f"{no_reshard}: load it with tensor_parallel_size="
            f"{saved['tensor_parallel_size']}, or save it again from the original model at "
            f"tensor_parallel_size={engine['tensor_parallel_size']}."
        )
    if saved["pipeline_parallel_size"] not in (None, engine["pipeline_parallel_size"]):
        raise ValueError(
            f"{model_dir} was saved with pipeline_parallel_size="
            f"{saved['pipeline_parallel_size']}, but the engine runs pipeline_parallel_size="
            f"{engine['pipeline_parallel_size']}. {no_reshard}."
        )
    if saved["dtype"] != engine["dtype"]:
        raise ValueError(
            f"{model_dir} was saved with dtype={saved['dtype']}, but the engine uses "
            f"dtype={engine['dtype']}. Converting or resharding is not supported yet: load it "
            f"with dtype={saved['dtype']!r}, or save it again at dtype={engine['dtype']!r}."
        )
    if saved["quantization"] != engine["quantization"]:
        raise ValueError(
            f"{model_dir} was saved with quantization={saved['quantization']!r}, but the engine "
            f"uses quantization={engine['quantization']!r}. {no_reshard}: load it with "
            f"quantization={saved['quantization']!r}."
        )


def list_some(names: list[str], limit: int = 20) -> str:
    """The first ``limit`` names, comma-separated, and how many there are in all."""
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
