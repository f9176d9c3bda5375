"""A lazy view of one GGUF tensor that dequantizes only the part a rank asks for.

GGUF stores a matrix row by row, each row a run of quant blocks (32 or 256 values each).
So a row range is a selection of whole rows before anything is decoded, and a column
range decodes only the blocks that cover it, then trims. A tensor-parallel rank thus
decodes about 1/TP of each sharded weight, not the whole tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from vllm.model_executor.model_loader.safetensors.reader import ReadStats
from vllm.model_executor.utils import narrow_by_ranges


def dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` decodes ``qtype`` (its classes are named by type)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    return isinstance(getattr(quants, qtype.name, None), type)


def supported_types() -> list[str]:
    return [t.name for t in GGMLQuantizationType if dequantizable(t)]


class GGUFTensor:
    """``narrow`` it, then index it (``[:]``) for a tensor of ``dtype``; the LoadedWeight
    protocol of ``vllm.model_executor.utils``, like ``safetensors.slices.TensorSlice``.

    ``data`` is the reader's memory-mapped array: (rows, row bytes) for a quantized
    matrix, (rows, columns) for F32/F16, one dimension for a vector. ``rows`` maps each row
    of the view to a row of the file (for a vector: each element), so a reordering such as
    llama.cpp's Q/K permutation is undone by choosing rows, within the same read.
    """

    def __init__(
        self,
        name: str,
        qtype: GGMLQuantizationType,
        data: np.ndarray,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        stats: ReadStats | None = None,
        rows: np.ndarray | None = None,
        cols: tuple[int, int] | None = None,
    ):
        if not dequantizable(qtype):
            raise ValueError(
                f"GGUF tensor {name!r} is stored as {qtype.name}, which gguf.quants cannot "
                f"dequantize; supported types: {', '.join(supported_types())}."
            )
        if len(shape) not in (1, 2):
            raise ValueError(
                f"GGUF tensor {name!r} has {len(shape)} dimensions {list(shape)}; the gguf "
                "loader reads vectors and matrices only."
            )
        self.name = name
        self.qtype = qtype
        self.data = data
        self.full_shape = shape
        self.dtype = dtype
        self.stats = stats
        self.rows = np.arange(shape[0]) if rows is None else rows
        self.cols = (0, shape[1]) if cols is None and len(shape) == 2 else cols
        self.shape = (len(self.rows),) + ((self.cols[1] - self.cols[0],) if self.cols else ())

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> GGUFTensor:
        if dim < 0:
            dim += len(self.shape)
        if not 0 <= dim < len(self.shape) or start < 0 or length < 0:
            raise IndexError(f"narrow({dim}, {start}, {length}) is invalid for {self.name}.")
        if start + length > self.shape[dim]:
            raise IndexError(
                f"narrow({dim}, {start}, {length}) is out of range for {self.name} with shape "
                f"{self.get_shape()}."
            )
        rows, cols = self.rows, self.cols
        if dim == 0:
            rows = rows[start : start + length]
        else:
            cols = (cols[0] + start, cols[0] + start + length)
        return GGUFTensor(
            self.name, self.qtype, self.data, self.full_shape, self.dtype, self.stats, rows, cols
        )

    def __getitem__(self, index) -> torch.Tensor:
        return narrow_by_ranges(self, index).materialize()

    def materialize(self) -> torch.Tensor:
        """Read and dequantize this view's rows and column blocks into a new tensor."""
        if len(self.full_shape) == 1:  # norms and biases: small, decoded whole
            raw = self.data
            out = _dequantize(raw, self.qtype)[self.rows]
        else:
            raw = self._raw_rows()
            block, _ = GGML_QUANT_SIZES[self.qtype]
            # Array columns per quant block: its bytes for packed types, 1 for F32/F16.
            per_block = self.data.shape[1] * block // self.full_shape[1]
            first, last = self.cols[0] // block, -(-self.cols[1] // block)
            raw = raw[:, first * per_block : last * per_block]
            skip = self.cols[0] - first * block
            out = _dequantize(raw, self.qtype)[:, skip : skip + self.shape[1]]
        if self.stats is not None:
            self.stats.bytes_read += raw.nbytes
        if not out.flags.writeable or not out.flags.c_contiguous or type(out) is not np.ndarray:
            out = np.array(out, dtype=np.float32, order="C")  # off the read-only mapping
        return torch.from_numpy(out).to(self.dtype)

    def _raw_rows(self) -> np.ndarray:
        """This view's rows of the file, still quantized: a plain slice for a run of rows,
        a gather (still only these rows) for a reordered selection."""
        rows = self.rows
        if len(rows) == 0:
            return self.data[:0]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows) and np.array_equal(rows, np.arange(lo, hi)):
            return self.data[lo:hi]
        return self.data[rows]


def _dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if raw.size == 0:
        rows = raw.shape[0] if raw.ndim == 2 else 0
        return np.zeros((rows, 0) if raw.ndim == 2 else (0,), dtype=np.float32)
    return quants.dequantize(np.ascontiguousarray(raw), qtype)
