"""A model's state tensors as views of one block laid out as its sharded-state file."""

from __future__ import annotations

import subprocess
import sys
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vllm.model_executor.model_loader.safetensors.format import (
    PAGE_SIZE,
    read_header,
    read_header_bytes,
)
from vllm.model_executor.model_loader.safetensors.writer import write_file
from vllm.model_executor.model_loader.sharded_state.weight_region import WeightRegion
from vllm.model_executor.model_loader.state_dict_utils import filter_subtensors


class Tiny(nn.Module):
    """Mixed dtypes, a tied weight, a persistent buffer with values, a 0-d parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6, dtype=torch.bfloat16)
        self.head = nn.Linear(6, 11, bias=False, dtype=torch.bfloat16)
        self.head.weight = self.embed.weight  # tied: one tensor, two names
        self.norm = nn.Parameter(torch.empty(6, dtype=torch.float32))
        self.gain = nn.Parameter(torch.empty((), dtype=torch.float16))
        self.register_buffer("scale", torch.tensor([0.5, 2.0], dtype=torch.float64))
        self.register_buffer("cache", torch.ones(3), persistent=False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return filter_subtensors(model.state_dict(keep_vars=True))


def _filled(seed: int) -> tuple[Tiny, WeightRegion]:
    model = Tiny()
    region = WeightRegion(model, _state(model))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, region


def test_region_holds_the_state_in_file_order_and_keeps_buffers():
    model, region = _filled(0)
    state = _state(model)
    assert region.state().keys() == state.keys()
    assert torch.equal(model.scale, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert model.head.weight is model.embed.weight  # still tied
    base = region.base.data_ptr()
    spans = sorted((t.data_ptr() - base, t.nbytes) for t in state.values())
    assert spans[0][0] == 0 and sum(n for _, n in spans) == region.nbytes  # no gap
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))  # back to back
    assert region.intact()
    model.norm.data = torch.zeros(6)
    assert not region.intact()


def test_region_is_not_intact_once_the_state_changes():
    """Data swapped, a parameter or buffer replaced or added, a submodule replaced."""
    changes = {
        "data": lambda m: setattr(m.norm, "data", torch.zeros(6)),
        "param": lambda m: setattr(m, "norm", nn.Parameter(m.norm.detach().clone())),
        "buffer": lambda m: setattr(m, "scale", m.scale.clone()),
        "new buffer": lambda m: m.register_buffer("extra", torch.ones(2)),
        "module": lambda m: setattr(m, "head", nn.Linear(6, 11, bias=False)),
    }
    for what, change in changes.items():
        model, region = _filled(5)
        nn.Linear(2, 2)  # another module built meanwhile: the region looks, still intact
        assert region.intact(), what
        change(model)
        assert not region.intact(), what
    model, region = _filled(6)
    model.register_buffer("unsaved", torch.ones(2), persistent=False)
    model.register_buffer("nothing", torch.empty(0))
    assert region.intact()  # neither is saved or loaded


def test_module_hooks_come_with_the_first_region_not_an_import():
    """Importing the loaders changes nothing in torch: the global registration hooks a
    region relies on are installed when the first region is built, once."""
    code = """
import torch.nn.modules.module as m
import vllm.model_executor.model_loader
from vllm.model_executor.model_loader.sharded_state.weight_region import WeightRegion
hooks = [m._global_parameter_registration_hooks, m._global_buffer_registration_hooks,
         m._global_module_registration_hooks]
assert not any(hooks), hooks
import torch
for _ in range(2):
    model = torch.nn.Linear(2, 2)
    WeightRegion(model, dict(model.state_dict(keep_vars=True)))
assert [len(h) for h in hooks] == [1, 1, 1], hooks
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_region_file_is_byte_identical_to_separate_tensors(tmp_path):
    model, region = _filled(1)
    one_piece, separate = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    size, crc = region.write(one_piece)
    copies = {k: t.detach().clone() for k, t in region.state().items()}
    assert write_file(separate, copies.items()) == (size, crc)
    data = open(one_piece, "rb").read()
    assert data == open(separate, "rb").read()
    assert size == len(data) and crc == zlib.crc32(data)
    assert read_header(one_piece).data_start % PAGE_SIZE == 0
    with safe_open(one_piece, framework="pt") as f:
        assert set(f.keys()) == set(copies)
        assert all(torch.equal(f.get_tensor(k), t) for k, t in copies.items())


def test_map_file_replaces_every_tensor_copy_on_write(tmp_path):
    saved, region = _filled(2)
    path = str(tmp_path / "w.safetensors")
    region.write(path)
    before = open(path, "rb").read()
    model, fresh = _filled(3)  # other values, same layout
    raw, data_start, size = read_header_bytes(path)
    assert fresh.matches(raw, data_start, size)
    fresh.map_file(path, data_start)
    want, got = saved.state_dict(), model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        model.norm.add_(1)  # a private copy of that page
    assert torch.equal(model.norm, want["norm"] + 1)
    assert open(path, "rb").read() == before


def test_other_layouts_do_not_match(tmp_path):
    model, region = _filled(4)
    upstream = str(tmp_path / "u.safetensors")
    save_file({k: t.detach().clone() for k, t in region.state().items()}, upstream)
    assert not region.matches(*read_header_bytes(upstream))  # 8-byte padding, other order
    other = str(tmp_path / "o.safetensors")
    state = region.state()
    state["norm"] = torch.zeros(3)  # another shape
    write_file(other, state.items())
    assert not region.matches(*read_header_bytes(other))
