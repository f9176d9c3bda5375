"""A rank's weights as views of one page-aligned block of memory, laid out as its file.

``initialize_model`` builds a CPU model's state tensors (parameters and persistent
buffers) as views of one anonymous mapping, in the order ``write_file`` stores them. A
sharded-state file saved from such a model holds the same bytes in the same order, its
data starting at a page boundary. Loading it is then one ``mmap(MAP_FIXED|MAP_PRIVATE)``
of the file over the block: every tensor reads the file's pages at once, with no work
per tensor, so a checkpoint of 10k small tensors maps as fast as one of 100 large ones.
Pages are shared with the page cache and copied on write, like ``map_file``. Saving is
one write of the block.

Parameters' initial values are not kept (every loader fills every parameter); buffers'
are. A file of another layout (upstream's, several parts per rank) or a model whose
tensors were given other memory after it was built takes the per-tensor paths.
"""

from __future__ import annotations

import functools
import mmap
import weakref

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from vllm.model_executor.model_loader.safetensors.format import PAGE_SIZE
from vllm.model_executor.model_loader.safetensors.mapping import TypedViews, map_over, populate
from vllm.model_executor.model_loader.safetensors.writer import header_json, plan_layout, write_raw

# Attribute set on a model by ``build_region``.
REGION_ATTR = "_weight_region"

# Bumped whenever any module registers a parameter, buffer or submodule, e.g. a weight
# replaced by ``module.weight = nn.Parameter(...)``: a region built before the last bump
# checks the model's state dict before it vouches for it (``WeightRegion.intact``).
_registrations = [0]


def _count_registration(*_args) -> None:
    _registrations[0] += 1


@functools.cache
def _watch_registrations() -> None:
    """Install torch's global registration hooks that count into ``_registrations``, once,
    when the first region is built: a process that never builds one runs without them."""
    register_module_parameter_registration_hook(_count_registration)
    register_module_buffer_registration_hook(_count_registration)
    register_module_module_registration_hook(_count_registration)


class WeightRegion:
    """State tensors moved into one page-aligned anonymous mapping, in file order."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        """``state``: the distinct tensors of ``model`` to hold (``filter_subtensors`` of
        ``state_dict(keep_vars=True)``), all on the CPU. Buffers keep their values;
        parameters are uninitialised, their bytes are not copied."""
        self._model = weakref.ref(model)  # the region lives on the model: no cycle
        items, header, self.nbytes = plan_layout(state.items())
        self.header_json = header_json(header)  # what a file of this layout starts with
        self._memory = mmap.mmap(-1, max(self.nbytes, 1), flags=mmap.MAP_PRIVATE)
        self.base = torch.frombuffer(self._memory, dtype=torch.uint8)
        self.address = self.base.data_ptr()
        self.names = [name for name, _ in items]
        self.tensors = [t for _, t in items]
        offsets = [header[name]["data_offsets"][0] for name in self.names]
        self._addresses = [self.address + offset for offset in offsets]
        views = TypedViews(self.base)
        for t, offset in zip(self.tensors, offsets):
            view = views.view(t.dtype, t.shape, offset)
            if not isinstance(t, nn.Parameter):
                view.copy_(t)
            t.data = view
        _watch_registrations()
        self._seen = _registrations[0]

    def intact(self) -> bool:
        """Whether the model's state is still exactly the region's tensors, each a view at
        its place: no data swapped (``param.data = ...``), no tensor replaced or added."""
        if list(map(torch.Tensor.data_ptr, self.tensors)) != self._addresses:
            return False
        if self._seen != _registrations[0]:  # something registered since: look
            model = self._model()
            if model is None or not self._holds(model.state_dict(keep_vars=True)):
                return False
            self._seen = _registrations[0]
        return True

    def _holds(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether ``state`` (the model's, ``keep_vars=True``) holds the region's tensors
        under their names, and otherwise only aliases of them or empty tensors."""
        if any(state.get(n) is not t for n, t in zip(self.names, self.tensors)):
            return False
        ids = set(map(id, self.tensors))
        return all(id(t) in ids or t.numel() == 0 for t in state.values())

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors by name, in file order."""
        return dict(zip(self.names, self.tensors))

    def matches(self, raw_header: bytes, data_start: int, size: int) -> bool:
        """Whether a file with this header (its JSON text and padding), data start and
        size holds exactly this region's tensors at this region's offsets, so that its
        data maps in place. Files saved by ``write_file`` from this layout do."""
        return (
            data_start % PAGE_SIZE == 0
            and size == data_start + self.nbytes
            and raw_header.rstrip(b" ") == self.header_json
        )

    def write(self, path: str) -> tuple[int, int]:
        """Write the region as a safetensors file (``write_raw``): its header, then its
        memory in one piece; returns (size in bytes, CRC-32 of the file)."""
        data = memoryview(self.base[: self.nbytes].numpy())
        return write_raw(path, self.header_json, [data])

    def map_file(self, path: str, data_start: int) -> None:
        """Put the file's data (from ``data_start``, a page boundary) in place of the
        region's memory: private, copy-on-write, page tables filled."""
        if not self.nbytes:
            return
        map_over(self.address, self.nbytes, path, data_start)
        populate(self._memory, 0, self.nbytes)


def build_region(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Move ``model``'s distinct state tensors ``state`` (all on the CPU) into one
    ``WeightRegion``, kept on the model."""
    object.__setattr__(model, REGION_ATTR, WeightRegion(model, state))


def get_region(model: nn.Module) -> WeightRegion | None:
    return getattr(model, REGION_ATTR, None)
