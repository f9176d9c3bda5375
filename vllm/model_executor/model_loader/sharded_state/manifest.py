"""The sharded-state directory format: file-name patterns and the manifest.

Per rank, files named by a pattern with ``{rank}`` and ``{part}`` (upstream vLLM's default
``model-rank-{rank}-part-{part}.safetensors``); beside them this engine writes a manifest,
``sharded_state.json`` (``Manifest``), recording the configuration the checkpoint was
saved under, every file's size and CRC-32, and every tensor's dtype, local shape, global
shape and shard dim.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
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
    for literal, key, spec, conv in string.Formatter().parse(pattern):
        out.append(re.escape(literal))
        if key == "rank" and rank is not None:
            one = "{rank" + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            out.append(re.escape(one.format(rank=rank)))
        elif key is not None:
            out.append(f"(?P<{key}>.+?)")
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


@dataclass
class ManifestFile:
    """One shard file: whose it is, its size and CRC-32, and the tensors it holds."""

    rank: int
    part: int
    size: int
    crc32: int
    tensors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "part": self.part,
            "size": self.size,
            "crc32": f"{self.crc32:08x}",
            "tensors": self.tensors,
        }


@dataclass
class ManifestTensor:
    """One tensor: its dtype, this rank's shape and the TP-independent whole."""

    dtype: str
    local_shape: list[int]
    global_shape: list[int]
    shard_dim: int | None  # None: every rank holds all of it
    local_shapes: list[list[int]] | None = None  # per rank, where ranks hold different sizes
    # The parameter's ShardSpec (layers.shard_spec) as JSON: which global rows each rank
    # holds at any TP size. None in manifests written before it was recorded.
    shard_spec: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "dtype": self.dtype,
            "local_shape": self.local_shape,
            "global_shape": self.global_shape,
            "shard_dim": self.shard_dim,
        }
        if self.local_shapes is not None:
            out["local_shapes"] = self.local_shapes
        if self.shard_spec is not None:
            out["shard_spec"] = self.shard_spec
        return out


@dataclass
class Manifest:
    """``sharded_state.json``. The configuration fields hold what the file says; ``check``
    compares them with the engine's."""

    architecture: str | None
    tensor_parallel_size: int | None
    pipeline_parallel_size: int | None
    dtype: str | None
    quantization: str | None
    pattern: str
    files: dict[str, ManifestFile]
    tensors: dict[str, ManifestTensor]
    format_version: int = FORMAT_VERSION
    # The quantization method's parameters (``QuantizationConfig.to_dict``).
    quantization_config: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The manifest as JSON with one line per file and per tensor: readable and
        greppable, and much faster to write than ``json.dump(indent=...)``, whose
        pure-Python encoder is slow for thousands of tensors."""
        fields = {
            "format": "vllm-sharded-state",
            "format_version": self.format_version,
            "architecture": self.architecture,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "quantization_config": self.quantization_config,
            "pattern": self.pattern,
            "checksum": "crc32",
        }
        lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in fields.items()]
        for key, table in (("files", self.files), ("tensors", self.tensors)):
            entries = ",\n".join(
                f"  {json.dumps(name)}: {json.dumps(entry.to_json())}"
                for name, entry in table.items()
            )
            lines.append(
                f" {json.dumps(key)}: {{\n{entries}\n }}"
                if entries
                else f" {json.dumps(key)}: {{}}"
            )
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; raises ValueError or TypeError for one that is not valid,
        e.g. one naming a file its pattern does not give (never a path out of the
        directory)."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' table")
        pattern = validate_pattern(data.get("pattern"))
        files = {}
        for name, info in data["files"].items():
            if not isinstance(info, dict) or not all(
                isinstance(info.get(key), int) for key in ("rank", "part", "size")
            ):
                raise ValueError(f"bad entry for {name}")
            crc = int(info.get("crc32"), 16)
            # Only the names the pattern gives: never a path out of the directory.
            expected = pattern.format(rank=info["rank"], part=info["part"])
            if name != expected:
                raise ValueError(
                    f"it lists a file {name!r} for rank {info['rank']} part {info['part']}, "
                    f"where its pattern {pattern!r} names {expected!r}"
                )
            tensors = info.get("tensors", [])
            if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
                raise ValueError(f"bad tensor list for {name}")
            files[name] = ManifestFile(info["rank"], info["part"], info["size"], crc, tensors)
        tensors = data.get("tensors", {})
        if not isinstance(tensors, dict):
            raise ValueError("the 'tensors' table is not an object")
        return cls(
            architecture=data.get("architecture"),
            tensor_parallel_size=data.get("tensor_parallel_size"),
            pipeline_parallel_size=data.get("pipeline_parallel_size"),
            dtype=data.get("dtype"),
            quantization=data.get("quantization"),
            quantization_config=data.get("quantization_config"),
            pattern=pattern,
            files=files,
            tensors={name: _tensor_from_json(name, info) for name, info in tensors.items()},
            format_version=data.get("format_version"),
        )

    def rank_files(self, rank: int) -> list[tuple[str, ManifestFile]]:
        """(name, entry) of ``rank``'s files, in part order."""
        mine = [(info.part, name, info) for name, info in self.files.items() if info.rank == rank]
        return [(name, info) for _, name, info in sorted(mine, key=lambda x: (x[0], x[1]))]

    def check(self, vllm_config: VllmConfig, model_dir: str) -> None:
        """Refuse a checkpoint saved under a configuration the engine does not run."""
        path = os.path.join(model_dir, MANIFEST_NAME)
        version = self.format_version
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {version!r}; this build reads versions up to "
                f"{FORMAT_VERSION}. Upgrade vllm, or save the checkpoint again with this build."
            )
        engine = engine_config_info(vllm_config)
        saved = {key: getattr(self, key) for key in engine}
        no_reshard = "Resharding is not supported yet"
        if saved["architecture"] != engine["architecture"]:
            raise ValueError(
                f"{model_dir} was saved from architecture {saved['architecture']}, but its config "
                f"names {engine['architecture']}. Save the checkpoint again from the right model."
            )
        # Another tensor_parallel_size is resharded on load (``resharder``).
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
                f"{model_dir} was saved with quantization={saved['quantization']!r}, but the "
                f"engine uses quantization={engine['quantization']!r}: load it with "
                f"quantization={saved['quantization']!r}, or without quantization= (the "
                "manifest's is then used)."
            )


def _tensor_from_json(name: str, info: Any) -> ManifestTensor:
    if not isinstance(info, dict):
        raise ValueError(f"bad tensor entry for {name}")
    entry = ManifestTensor(
        info.get("dtype"),
        info.get("local_shape"),
        info.get("global_shape"),
        info.get("shard_dim"),
        info.get("local_shapes"),
        info.get("shard_spec"),
    )
    shapes = [entry.local_shape, entry.global_shape, *(entry.local_shapes or [])]
    if (
        not isinstance(entry.dtype, str)
        or not all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in shapes)
        or not (entry.shard_dim is None or isinstance(entry.shard_dim, int))
        or not (entry.local_shapes is None or isinstance(entry.local_shapes, list))
        or not (entry.shard_spec is None or isinstance(entry.shard_spec, dict))
    ):
        raise ValueError(f"bad tensor entry for {name}: {info!r:.120}")
    return entry


def read_manifest(model_dir: str) -> Manifest | None:
    """The manifest of ``model_dir``, or None where there is none (saved by upstream);
    raises ShardFileError naming a manifest that is corrupt."""
    path = os.path.join(model_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return Manifest.from_json(f.read())
    except (ValueError, TypeError) as e:
        raise ShardFileError(
            f"{path} is corrupt ({e}); save the checkpoint again, or delete the file to load "
            "without verification."
        ) from e


def engine_config_info(vllm_config: VllmConfig) -> dict[str, Any]:
    mc = vllm_config.model_config
    return {
        "architecture": mc.architecture,
        "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
        "pipeline_parallel_size": vllm_config.parallel_config.pipeline_parallel_size,
        "dtype": dtype_name(mc.dtype),
        "quantization": mc.quantization,
        "quantization_config": mc.quant_config.to_dict() if mc.quant_config else None,
    }
