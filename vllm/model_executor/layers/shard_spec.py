"""How a tensor-parallel parameter is sharded, stated as data.

Every parallel layer sets ``param.shard_spec`` on its parameters. The spec is
independent of the TP size: it describes the GLOBAL tensor (what one rank holds at
TP=1, without vocabulary padding) as segments along one dimension, and says for any
``(rank, tp_size)`` which global rows land at which local rows. The checkpoint loader,
the sharded-state manifest and the resharder (TP=M -> TP=N) all read this one answer
instead of guessing from shapes.

Pure Python: nothing here needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Piece:
    """Global rows ``[global_start, global_start + length)`` along the spec's dim sit at
    local rows ``[local_start, local_start + length)`` of one rank's tensor."""

    global_start: int
    length: int
    local_start: int


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of ``size`` rows of the global tensor, split over ranks in whole ``unit``s.

    - Plain: the ``size // unit`` units split evenly over the ranks.
    - ``replicate``: when the TP size exceeds the number of units (KV heads under GQA or
      MQA), each unit is replicated: rank r holds unit ``r // (tp_size // units)``.
    - ``pad_multiple`` (vocabulary): the units are padded up to a multiple of
      ``pad_multiple * tp_size`` and then split evenly; a rank's rows past ``size`` are
      padding that no global row maps to. None: no padding.
    """

    size: int
    unit: int = 1
    replicate: bool = False
    pad_multiple: int | None = None

    def __post_init__(self) -> None:
        sizes = (self.size, self.unit)
        if not all(isinstance(v, int) and v >= 1 for v in sizes) or self.size % self.unit:
            raise ValueError(
                f"Segment(size={self.size}, unit={self.unit}): size and unit must be "
                "positive and size a multiple of unit."
            )
        if self.pad_multiple is not None and self.pad_multiple < 1:
            raise ValueError(
                f"Segment pad_multiple={self.pad_multiple}: use a positive int, or None "
                "for no padding."
            )
        if self.replicate and self.pad_multiple is not None:
            raise ValueError(
                f"Segment(size={self.size}): replicate and pad_multiple exclude each "
                "other (replicated units are never padded)."
            )

    @property
    def units(self) -> int:
        return self.size // self.unit

    def why_not(self, tp_size: int) -> str | None:
        """Why this segment cannot be sharded over ``tp_size`` ranks; None if it can."""
        n = self.units
        if self.pad_multiple is not None or n % tp_size == 0:
            return None
        what = f"{n} units of {self.unit} rows" if self.unit > 1 else f"{n} rows"
        if not self.replicate:
            return f"{what} are not divisible by tensor_parallel_size={tp_size}"
        if tp_size > n and tp_size % n == 0:
            return None
        return (
            f"{what} can neither be split over nor replicated to "
            f"tensor_parallel_size={tp_size} (one must divide the other)"
        )

    def local_units(self, tp_size: int) -> int:
        """Units each rank holds (padding included)."""
        n = self.units
        if self.pad_multiple is not None:
            step = self.pad_multiple * tp_size
            return (n + step - 1) // step * self.pad_multiple
        if self.replicate and tp_size > n:
            return 1
        return n // tp_size

    def first_unit(self, rank: int, tp_size: int) -> int:
        """The global unit a rank's rows of this segment start at."""
        if self.replicate and tp_size > self.units:
            return rank // (tp_size // self.units)
        return rank * self.local_units(tp_size)


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """``dim``: the dimension split across ranks (None: every rank holds the whole
    tensor). ``segments``: the global rows along ``dim``, in order; a rank's tensor holds
    its part of each segment, concatenated in the same order (``[q_r; k_r; v_r]``)."""

    dim: int | None
    segments: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        if (self.dim is None) != (not self.segments):
            raise ValueError(
                f"ShardSpec(dim={self.dim}, {len(self.segments)} segments): a split "
                "dimension needs segments and a replicated spec (dim=None) has none."
            )
        if self.dim is not None and self.dim < 0:
            raise ValueError(f"ShardSpec dim={self.dim}: use a non-negative dimension.")

    @staticmethod
    def replicated() -> ShardSpec:
        return ShardSpec(None)

    @property
    def is_replicated(self) -> bool:
        return self.dim is None

    def _require_split(self, what: str) -> None:
        if self.dim is None:
            raise ValueError(
                f"ShardSpec.{what} of a replicated spec: every rank holds the whole "
                "tensor; check ShardSpec.is_replicated first."
            )

    @property
    def global_size(self) -> int:
        """Rows of the global tensor along ``dim`` (vocabulary padding excluded)."""
        self._require_split("global_size")
        return sum(s.size for s in self.segments)

    def working_tp_sizes(self, limit: int | None = None) -> list[int]:
        """The TP sizes up to ``limit`` (default: the most units of a segment) this spec
        can be sharded over."""
        if limit is None:
            limit = max((s.units for s in self.segments), default=1)
        return [t for t in range(1, limit + 1) if self._why_not(t) is None]

    def _why_not(self, tp_size: int) -> str | None:
        for s in self.segments:
            reason = s.why_not(tp_size)
            if reason is not None:
                return reason
        return None

    def check_tp(self, tp_size: int) -> None:
        """Raise a ValueError naming the sizes when ``tp_size`` ranks cannot hold this."""
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tensor_parallel_size={tp_size!r}: use a positive int.")
        reason = self._why_not(tp_size)
        if reason is not None:
            works = [str(t) for t in self.working_tp_sizes()]
            if len(works) > 1:
                works[-2:] = [f"{works[-2]} or {works[-1]}"]
            raise ValueError(
                f"Cannot shard dimension {self.dim} ({self.global_size} rows) over "
                f"tensor_parallel_size={tp_size}: {reason}; try {', '.join(works)}."
            )

    def local_size(self, tp_size: int) -> int:
        """Rows along ``dim`` each rank holds (vocabulary padding included)."""
        self._require_split("local_size")
        self.check_tp(tp_size)
        return sum(s.local_units(tp_size) * s.unit for s in self.segments)

    def local_pieces(self, rank: int, tp_size: int) -> list[Piece]:
        """Which global rows along ``dim`` make up rank ``rank``'s tensor, and where they
        go in it. Padding rows are covered by no piece."""
        self._require_split("local_pieces")
        self.check_tp(tp_size)
        if not 0 <= rank < tp_size:
            raise ValueError(f"rank {rank} is outside tensor_parallel_size={tp_size}.")
        pieces = []
        global_offset = local_offset = 0
        for s in self.segments:
            local = s.local_units(tp_size)
            first = s.first_unit(rank, tp_size)
            covered = max(0, min(local, s.units - first))
            if covered:
                pieces.append(Piece(global_offset + first * s.unit, covered * s.unit, local_offset))
            global_offset += s.size
            local_offset += local * s.unit
        return pieces

    def to_json(self) -> dict[str, Any]:
        """Plain dicts and lists for a manifest; fields at their default are left out."""
        segments = []
        for s in self.segments:
            entry: dict[str, Any] = {"size": s.size}
            if s.unit != 1:
                entry["unit"] = s.unit
            if s.replicate:
                entry["replicate"] = True
            if s.pad_multiple is not None:
                entry["pad_multiple"] = s.pad_multiple
            segments.append(entry)
        return {"dim": self.dim, "segments": segments}

    @staticmethod
    def from_json(data: dict[str, Any]) -> ShardSpec:
        """The spec ``to_json`` wrote; raises naming what is malformed."""
        if not isinstance(data, dict) or set(data) - {"dim", "segments"} or "dim" not in data:
            raise ValueError(
                f"Malformed shard spec {data!r}: expected a dict with 'dim' and 'segments'."
            )
        fields = {"size", "unit", "replicate", "pad_multiple"}
        segments = []
        for entry in data.get("segments", []):
            if not isinstance(entry, dict) or set(entry) - fields or "size" not in entry:
                raise ValueError(
                    f"Malformed shard spec segment {entry!r}: expected a dict with 'size' "
                    f"and optionally {', '.join(sorted(fields - {'size'}))}."
                )
            segments.append(Segment(**entry))
        return ShardSpec(data["dim"], tuple(segments))


def get_shard_spec(param: Any) -> ShardSpec:
    """``param.shard_spec``; replicated for parameters no parallel layer made (norms,
    plain ``nn.Parameter``s, buffers)."""
    spec = getattr(param, "shard_spec", None)
    return spec if spec is not None else ShardSpec.replicated()
