"""Direct safetensors I/O: the parallel whole-file reader, lazy slices, and the default
loader's "Loading weights took" line."""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from zlib_ng import zlib_ng

from vllm.model_executor.model_loader import base_loader
from vllm.model_executor.model_loader.safetensors import reader, staging
from vllm.model_executor.model_loader.safetensors.format import ShardFileError, read_header
from vllm.model_executor.model_loader.safetensors.reader import (
    ReadStats,
    default_num_threads,
    read_tensors,
)
from vllm.model_executor.model_loader.safetensors.slices import SafetensorsFile
from vllm.model_executor.model_loader.safetensors.writer import write_file
from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
from vllm.model_executor.utils import copy_weight

# ---------------------------------------------------------------------------------------
# Helpers


def _mixed_tensors(prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """Tensors of every common dtype, odd sizes, a 0-d scalar and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}.bf16": torch.randn(13, 7, generator=g).to(torch.bfloat16),
        f"{prefix}.fp16": torch.randn(5, 3, 11, generator=g).to(torch.float16),
        f"{prefix}.fp32": torch.randn(37, 5, generator=g),
        f"{prefix}.i64": torch.randint(-(2**40), 2**40, (29,), generator=g),
        f"{prefix}.bool": torch.rand(3, 17, generator=g) > 0.5,
        f"{prefix}.scalar": torch.tensor(float(seed) + 0.25),
        f"{prefix}.empty": torch.empty(0, 4),
        f"{prefix}.u8": torch.randint(0, 256, (9,), dtype=torch.uint8, generator=g),
    }


def _write(tmp_path, name: str, tensors: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    path = str(tmp_path / name)
    size, crc = write_file(path, tensors.items())
    return path, size, crc


def _targets_for(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Destinations of the right shapes and dtypes, filled so that a tensor left unread
    does not compare equal (NaN for floats)."""
    return {
        k: torch.full_like(v, float("nan") if v.is_floating_point() else 0)
        for k, v in tensors.items()
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def _data_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# ---------------------------------------------------------------------------------------
# read_tensors: whole files into a model's tensors


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("window", [64, 100, 16 << 20])
@pytest.mark.parametrize("verify", [False, True])
def test_parallel_read_many_files_mixed_dtypes(tmp_path, monkeypatch, threads, window, verify):
    """Several files, tensors split across windows and threads, load bit-exactly."""
    monkeypatch.setattr(reader, "_TASK_BYTES", window)
    originals, headers, sizes, crcs = {}, [], [], []
    for i in range(3):
        tensors = _mixed_tensors(f"f{i}", seed=i)
        path, size, crc = _write(tmp_path, f"f{i}.safetensors", tensors)
        originals.update(tensors)
        headers.append(read_header(path))
        sizes.append(size)
        crcs.append(crc)
    targets = _targets_for(originals)
    nbytes = read_tensors(headers, targets, crcs if verify else None, num_threads=threads)
    _assert_same(targets, originals)
    if verify:
        assert nbytes == sum(sizes) == sum(os.path.getsize(h.path) for h in headers)
    else:
        assert nbytes == _data_bytes(originals)


def test_parallel_read_bytes_read_mixed_verification(tmp_path, monkeypatch):
    """A verified file is read whole; an unverified one only its tensor data."""
    monkeypatch.setattr(reader, "_TASK_BYTES", 64)
    a, b = _mixed_tensors("a", 1), _mixed_tensors("b", 2)
    pa, size_a, crc_a = _write(tmp_path, "a.safetensors", a)
    pb, _, _ = _write(tmp_path, "b.safetensors", b)
    targets = _targets_for({**a, **b})
    nbytes = read_tensors([read_header(pa), read_header(pb)], targets, [crc_a, None], num_threads=2)
    _assert_same(targets, {**a, **b})
    assert nbytes == size_a + _data_bytes(b)


def test_parallel_read_more_tensors_than_iov_max(tmp_path):
    """Thousands of tiny tensors in one window (more than one preadv call can take)."""
    tensors = {f"t{i:05d}": torch.tensor([i, -i], dtype=torch.int32) for i in range(2500)}
    path, size, crc = _write(tmp_path, "many.safetensors", tensors)
    targets = _targets_for(tensors)
    assert read_tensors([read_header(path)], targets, [crc], num_threads=2) == size
    _assert_same(targets, tensors)


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_read_into_non_contiguous_destination(tmp_path, monkeypatch, threads):
    """A transposed destination gets the checkpoint's values in its logical layout."""
    monkeypatch.setattr(reader, "_TASK_BYTES", 16)
    src = {"w": torch.arange(12, dtype=torch.float32).reshape(4, 3), "v": torch.arange(5.0)}
    path, _, crc = _write(tmp_path, "nc.safetensors", src)
    dst = torch.empty(3, 4).t()
    assert not dst.is_contiguous()
    v = torch.zeros(5)
    read_tensors([read_header(path)], {"w": dst, "v": v}, [crc], num_threads=threads)
    assert torch.equal(dst, src["w"])
    assert torch.equal(v, src["v"])


@pytest.mark.parametrize(
    "device",
    [
        "staged-cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        ),
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("verify", [False, True])
def test_parallel_read_through_pinned_staging(tmp_path, monkeypatch, device, threads, verify):
    """CUDA destinations (and a mix with CPU ones in one file; on the CPU, every one
    read the way of a CUDA one) get exact bytes and the file's checksum; buffers of
    1 KiB make each thread reuse its two staging buffers many times."""
    monkeypatch.setattr(reader, "_TASK_BYTES", 4096)
    monkeypatch.setattr(staging, "STAGE_BYTES", 1024)
    if device == "staged-cpu":
        monkeypatch.setattr(staging, "STAGE_CPU_READS", True)
    src = _mixed_tensors("g", 5) | {"big": torch.randn(300, 70)}
    path, size, crc = _write(tmp_path, "cuda.safetensors", src)
    on = "cuda" if device == "cuda" else "cpu"
    dst = {
        k: torch.full_like(v, 0).to(on) if k != "big" else torch.empty_like(v)
        for k, v in src.items()
    }
    dst["g.fp32"] = torch.empty(5, 37, device=on).t()  # not contiguous: read, then copied
    nbytes = read_tensors([read_header(path)], dst, [crc] if verify else None, num_threads=threads)
    assert nbytes == (size if verify else _data_bytes(src))
    _assert_same({k: v.cpu() for k, v in dst.items()}, src)
    if verify:
        header = read_header(path)
        _flip_byte(path, header.data_start + (header.size - header.data_start) // 2)
        with pytest.raises(ShardFileError, match="Checksum mismatch"):
            read_tensors([header], dst, [crc], num_threads=threads)


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_read_flipped_byte_fails_checksum(tmp_path, monkeypatch, threads):
    """A corrupted data byte is reported with the path; without CRCs the file still loads."""
    monkeypatch.setattr(reader, "_TASK_BYTES", 64)
    tensors = _mixed_tensors("x", 3)
    good, _, good_crc = _write(tmp_path, "good.safetensors", tensors)
    other = _mixed_tensors("y", 4)
    path, _, crc = _write(tmp_path, "bad.safetensors", other)
    header = read_header(path)
    _flip_byte(path, header.data_start + (header.size - header.data_start) // 2)
    headers = [read_header(good), read_header(path)]
    with pytest.raises(ShardFileError, match="Checksum mismatch") as info:
        read_tensors(
            headers, _targets_for({**tensors, **other}), [good_crc, crc], num_threads=threads
        )
    assert path in str(info.value)
    assert good not in str(info.value)
    # Without checksums nothing notices: the file loads, with one value changed.
    targets = _targets_for({**tensors, **other})
    read_tensors(headers, targets, num_threads=threads)
    _assert_same({k: targets[k] for k in tensors}, tensors)
    assert any(not torch.equal(targets[k], v) for k, v in other.items())


@pytest.mark.parametrize("verify", [False, True])
def test_parallel_read_file_truncated_after_header(tmp_path, monkeypatch, verify):
    """A file cut short between read_header and read is named, not read as zeros."""
    monkeypatch.setattr(reader, "_TASK_BYTES", 64)
    tensors = _mixed_tensors("t", 5)
    path, _, crc = _write(tmp_path, "trunc.safetensors", tensors)
    header = read_header(path)
    os.truncate(path, header.size - 50)
    with pytest.raises(ShardFileError) as info:
        read_tensors([header], _targets_for(tensors), [crc] if verify else None, num_threads=3)
    assert path in str(info.value)


def test_parallel_read_missing_file_is_named(tmp_path):
    tensors = {"a": torch.ones(3)}
    path, _, _ = _write(tmp_path, "gone.safetensors", tensors)
    header = read_header(path)
    os.remove(path)
    with pytest.raises(ShardFileError, match=re.escape(path)):
        read_tensors([header], _targets_for(tensors), num_threads=2)


def test_default_num_threads_env(monkeypatch):
    monkeypatch.setenv("VLLM_LOAD_THREADS", "5")
    assert default_num_threads() == 5
    monkeypatch.delenv("VLLM_LOAD_THREADS")
    assert 1 <= default_num_threads() <= 8


@pytest.mark.parametrize("value", ["0", "abc", "-2"])
def test_default_num_threads_rejects_bad_values(monkeypatch, value):
    monkeypatch.setenv("VLLM_LOAD_THREADS", value)
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        default_num_threads()


# ---------------------------------------------------------------------------------------
# SafetensorsFile / TensorSlice


SHAPES = [(10,), (6, 7), (4, 5, 6)]


def _ranges(n: int) -> list[tuple[int, int]]:
    """(start, length) pairs: whole, first, last, middle, empty."""
    return sorted({(0, n), (0, 1), (n - 1, 1), (1, n - 2), (n // 2, 0), (2, 2)})


@pytest.fixture()
def nd_file(tmp_path):
    tensors = {
        f"t{len(s)}": torch.randn(*s, generator=torch.Generator().manual_seed(len(s)))
        for s in SHAPES
    }
    tensors["half"] = torch.randn(6, 7).to(torch.bfloat16)
    path, _, _ = _write(tmp_path, "nd.safetensors", tensors)
    return path, tensors


@pytest.fixture(params=["mapped", "small", "staged", "staged_mapped"])
def strided_path(request, monkeypatch) -> str:
    """Run a test for each way a slice is read: "mapped" (strided slices copied out of a
    mapping; every tensor counts as large), "small" (the whole tensor read into a
    scratch buffer; every tensor of these tests is small), and the way of a CUDA
    destination, "staged" and "staged_mapped" (staging buffers of 64 bytes: runs cut
    and joined again, rows longer than a buffer read one by one; strided slices taken
    out of whole rows, or for large tensors copied into the buffers out of mappings)."""
    if request.param == "mapped" or request.param == "staged_mapped":
        monkeypatch.setattr(reader, "_SMALL_TENSOR_BYTES", 0)
    if request.param.startswith("staged"):
        monkeypatch.setattr(staging, "STAGE_CPU_READS", True)
        monkeypatch.setattr(staging, "STAGE_BYTES", 64)
    return request.param


def _check_bytes_taken(taken: int, want: torch.Tensor, full: torch.Tensor, path: str) -> None:
    """What reading ``want`` (a narrow of ``full``) costs: its own bytes when it is one run
    of memory (or the mapped path copies it), else the whole small tensor; staged, the
    rows it spans (at most the tensor)."""
    if want.is_contiguous() or path.endswith("mapped"):
        assert taken == want.nbytes
    elif path == "small":
        assert taken == full.nbytes
    else:
        assert want.nbytes <= taken <= full.nbytes


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_narrow_each_dim_reads_only_the_slice(nd_file, shape, strided_path):
    """narrow + read_into / [:] equals torch.narrow; a slice that is one run of the file
    reads exactly its bytes, a strided one its bytes through a mapping, or the whole
    tensor when that is small."""
    path, tensors = nd_file
    name = f"t{len(shape)}"
    want_full = tensors[name]
    stats = ReadStats()
    with SafetensorsFile(path, stats) as f:
        sl = f.get_slice(name)
        assert sl.get_shape() == list(shape)
        assert sl.dtype == torch.float32
        for dim, n in enumerate(shape):
            for start, length in _ranges(n):
                want = want_full.narrow(dim, start, length)
                view = sl.narrow(dim, start, length)
                assert view.get_shape() == list(want.shape)
                before = stats.bytes_read
                out = torch.full(want.shape, float("nan"))
                view.read_into(out)
                assert torch.equal(out, want), (dim, start, length)
                taken = stats.bytes_read - before
                _check_bytes_taken(taken, want, want_full, strided_path)
                before = stats.bytes_read
                got = view[:]
                assert torch.equal(got, want)
                assert stats.bytes_read - before == taken


def test_chained_narrows(nd_file, strided_path):
    """Narrows compose like torch.narrow, incl. two narrows of the same dim."""
    path, tensors = nd_file
    t = tensors["t3"]
    stats = ReadStats()
    with SafetensorsFile(path, stats) as f:
        sl = f.get_slice("t3")
        chains = [
            [(0, 1, 2), (2, 3, 2)],
            [(1, 1, 3), (0, 2, 2), (2, 0, 5)],
            [(2, 1, 4), (2, 1, 2)],
            [(0, 0, 4), (1, 0, 5), (2, 0, 6)],
            [(1, 2, 2), (1, 1, 1), (0, 3, 1)],
        ]
        for chain in chains:
            view, want = sl, t
            for dim, start, length in chain:
                view, want = view.narrow(dim, start, length), want.narrow(dim, start, length)
            before = stats.bytes_read
            out = torch.empty(want.shape)
            view.read_into(out)
            assert torch.equal(out, want), chain
            _check_bytes_taken(stats.bytes_read - before, want, t, strided_path)


def test_indexing_matches_torch(nd_file):
    path, tensors = nd_file
    t, h = tensors["t3"], tensors["half"]
    with SafetensorsFile(path) as f:
        sl = f.get_slice("t3")
        assert torch.equal(sl[...], t)
        assert torch.equal(sl[1:3], t[1:3])
        assert torch.equal(sl[:, 2:], t[:, 2:])
        assert torch.equal(sl[1:3, -3:-1, 2:5], t[1:3, -3:-1, 2:5])
        assert torch.equal(sl[:, :, 4:100], t[:, :, 4:100])
        assert sl[3:1].shape == (0, 5, 6)
        hs = f.get_slice("half")
        assert hs.dtype == torch.bfloat16
        got = hs[:, 3:5]
        assert got.dtype == torch.bfloat16 and torch.equal(got, h[:, 3:5])
        with pytest.raises(TypeError):
            sl[::2]


def test_scalar_empty_and_bool(tmp_path):
    tensors = {
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 3),
        "mask": torch.tensor([[True, False, True], [False, False, True]]),
        "ids": torch.tensor([1, 2**40, -3]),
    }
    path, _, _ = _write(tmp_path, "misc.safetensors", tensors)
    stats = ReadStats()
    with SafetensorsFile(path, stats) as f:
        assert sorted(f.keys()) == sorted(tensors)
        s = f.get_slice("scalar")
        assert s.get_shape() == []
        assert torch.equal(s[()], tensors["scalar"])
        assert f.get_slice("empty")[:].shape == (0, 3)
        assert torch.equal(f.get_slice("mask")[:, 1:], tensors["mask"][:, 1:])
        assert torch.equal(f.get_slice("ids").narrow(0, 1, 2)[:], tensors["ids"][1:])
    assert stats.bytes_read == 2 + 0 + 6 + 16  # the small mask's columns: all of it


def test_out_of_range_narrow_raises_index_error(nd_file):
    path, _ = nd_file
    with SafetensorsFile(path) as f:
        sl = f.get_slice("t2")  # (6, 7)
        for args in [(0, 5, 2), (1, 0, 8), (0, -1, 2), (1, 2, -1), (0, 7, 0)]:
            with pytest.raises(IndexError, match="t2"):
                sl.narrow(*args)
        # Relative to the narrowed view, not the whole tensor.
        with pytest.raises(IndexError):
            sl.narrow(1, 2, 4).narrow(1, 1, 4)
        assert sl.narrow(1, 2, 4).narrow(1, 1, 3).get_shape() == [6, 3]


def test_read_into_rejects_wrong_destination(nd_file):
    path, _ = nd_file
    with SafetensorsFile(path) as f:
        sl = f.get_slice("t2").narrow(0, 1, 3)  # (3, 7) float32
        with pytest.raises(ValueError, match="of the slice's dtype .torch.float32.*float64"):
            sl.read_into(torch.empty(3, 7, dtype=torch.float64))  # a cast only on CUDA
        with pytest.raises(ValueError, match=r"\[6, 7\] != slice \[3, 7\]"):
            sl.read_into(torch.empty(6, 7))
        with pytest.raises(ValueError, match="contiguous"):
            sl.read_into(torch.empty(7, 3).t())  # right shape, not contiguous
        dst = torch.empty(3, 7)
        sl.read_into(dst)  # the right one works


def test_written_files_are_standard_safetensors(tmp_path):
    """Files from write_file open with safetensors.safe_open, slices included."""
    tensors = _mixed_tensors("m", 7)
    path, size, crc = _write(tmp_path, "std.safetensors", tensors)
    assert size == os.path.getsize(path)
    with open(path, "rb") as f:
        assert crc == zlib.crc32(f.read())
    with safe_open(path, framework="pt", device="cpu") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata().get("format") == "pt"
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
        assert torch.equal(f.get_slice("m.fp32")[3:9, 1:4], tensors["m.fp32"][3:9, 1:4])


def test_upstream_written_file_reads_correctly(tmp_path):
    """A checkpoint written by safetensors.torch.save_file loads through SafetensorsFile."""
    tensors = _mixed_tensors("u", 8)
    tensors["u.big"] = torch.randn(33, 17)
    path = str(tmp_path / "upstream.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    stats = ReadStats()
    with SafetensorsFile(path, stats) as f:
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            sl = f.get_slice(k)
            got = sl[()] if v.dim() == 0 else sl[:]
            assert got.dtype == v.dtype and torch.equal(got, v), k
        col = f.get_slice("u.big").narrow(1, 5, 3)
        assert torch.equal(col[:], tensors["u.big"][:, 5:8])
    assert stats.bytes_read == _data_bytes(tensors) + 33 * 17 * 4  # small: read whole
    # read_tensors takes the same file.
    targets = _targets_for(tensors)
    size = os.path.getsize(path)
    assert (
        read_tensors(
            [read_header(path)], targets, [zlib_ng.crc32(open(path, "rb").read())], num_threads=2
        )
        == size
    )
    _assert_same(targets, tensors)


def test_weights_iterator_counts_bytes(tmp_path):
    """safetensors_weights_iterator yields lazy slices; stats counts what was read."""
    a, b = _mixed_tensors("a", 9), {"b.w": torch.randn(8, 6)}
    pa, _, _ = _write(tmp_path, "a.safetensors", a)
    pb = str(tmp_path / "b.safetensors")
    save_file(b, pb)
    stats = ReadStats()
    seen = {}
    for name, w in safetensors_weights_iterator([pa, pb], stats):
        if name == "b.w":
            seen[name] = w.narrow(0, 4, 4)[:]  # a TP rank's half
        else:
            seen[name] = w[()] if not w.get_shape() else w[:]
    assert set(seen) == set(a) | set(b)
    _assert_same({k: seen[k] for k in a}, a)
    assert torch.equal(seen["b.w"], b["b.w"][4:])
    assert stats.bytes_read == _data_bytes(a) + 4 * 6 * 4


def test_column_slice_is_one_mapped_copy(tmp_path, monkeypatch):
    """A column range of every row (a row-parallel weight's rank slice) is copied out of
    a mapping in one go, not read row by row; the mapping is gone afterwards."""
    w = torch.randn(300, 1024)  # over 1 MiB: small tensors take one read instead
    path, _, _ = _write(tmp_path, "rows.safetensors", {"w": w})
    reads = []
    original = reader.preadv_fully
    monkeypatch.setattr(reader, "preadv_fully", lambda *a: reads.append(a) or original(*a))
    stats = ReadStats()
    pool = ThreadPoolExecutor(2)
    with SafetensorsFile(path, stats, pool) as f:
        out = torch.empty(300, 16)
        f.get_slice("w").narrow(1, 16, 16).read_into(out)
        f.wait()
        assert torch.equal(out, w[:, 16:32])
        assert stats.bytes_read == out.nbytes
        assert not reads
        with open("/proc/self/maps") as maps:
            assert path not in maps.read()
    pool.shutdown()


@pytest.mark.parametrize("wait", [False, True])
def test_column_slice_of_small_tensor_is_one_read(tmp_path, monkeypatch, wait):
    """A column range of a small tensor (1 MiB or less) is copied out of the whole tensor,
    read with one preadv, never mapped; the bytes read count the whole tensor."""
    w = torch.randn(300, 64)
    path, _, _ = _write(tmp_path, "small.safetensors", {"w": w, "b": torch.randn(7)})
    reads = []
    original = reader.preadv_fully
    monkeypatch.setattr(reader, "preadv_fully", lambda *a: reads.append(a) or original(*a))
    monkeypatch.setattr(mmap, "mmap", None)  # any mapping would fail
    stats = ReadStats()
    pool = ThreadPoolExecutor(2)
    with SafetensorsFile(path, stats, pool) as f:
        out = torch.empty(300, 16)
        f.get_slice("w").narrow(1, 16, 16).read_into(out, wait=wait)
        f.wait()
        assert torch.equal(out, w[:, 16:32])
        two = f.get_slice("w").narrow(0, 100, 2).narrow(1, 3, 5)[:]  # chained, via [:]
        assert torch.equal(two, w[100:102, 3:8])
    pool.shutdown()
    assert len(reads) == 2
    assert stats.bytes_read == 2 * w.nbytes


def test_queued_reads_land_after_the_iterator_ends(tmp_path, monkeypatch):
    """read_into through the iterator only queues reads (several threads, big reads
    split): every parameter holds its bytes once the iteration is over."""
    monkeypatch.setattr(reader, "_TASK_BYTES", 256)  # many tasks per tensor
    monkeypatch.setenv("VLLM_LOAD_THREADS", "3")
    a = {f"w{i}": torch.randn(40, 33) for i in range(6)}
    path, _, _ = _write(tmp_path, "q.safetensors", a)
    got = {k: torch.full((20, 33) if k == "w0" else (40, 33), float("nan")) for k in a}
    for name, w in safetensors_weights_iterator([path]):
        copy_weight(got[name], w.narrow(0, 20, 20) if name == "w0" else w)
    assert torch.equal(got["w0"], a["w0"][20:])
    _assert_same({k: got[k] for k in a if k != "w0"}, {k: a[k] for k in a if k != "w0"})


def test_small_reads_are_gathered_into_few_preadvs(tmp_path, monkeypatch):
    """Many small tensors stored back to back reach the pool as one task and one preadv
    (one per tensor would cost more than the bytes), and all land by wait()."""
    a = {f"w{i:03d}": torch.randn(8, 16) for i in range(200)}
    path, _, _ = _write(tmp_path, "small.safetensors", a)
    calls = []
    original = reader.preadv_fully
    monkeypatch.setattr(
        reader,
        "preadv_fully",
        lambda fd, views, *r: calls.append(len(views)) or original(fd, views, *r),
    )
    pool = ThreadPoolExecutor(2)
    got = {k: torch.full_like(v, float("nan")) for k, v in a.items()}
    with SafetensorsFile(path, pool=pool) as f:
        for name in reversed(f.keys()):  # any order: runs are sorted back into file order
            f.get_slice(name).read_into(got[name])
        assert not calls  # gathered, not read yet
        f.wait()
    pool.shutdown()
    _assert_same(got, a)
    assert calls == [200]


def test_reads_into_views_of_one_buffer(tmp_path, monkeypatch):
    """Destinations that share one buffer (a model in its weight block) each get exactly
    their bytes, row slices included, and the bytes between them are left alone; a
    destination with a buffer of its own is not held once its read is done."""
    monkeypatch.setattr(reader, "_TASK_BYTES", 512)  # big tensors over tasks
    a = {f"w{i}": torch.randn(40 + i, 9) for i in range(5)}
    a["scalar"] = torch.tensor(2.5)
    path, _, _ = _write(tmp_path, "shared.safetensors", a)
    block = torch.full((4096,), float("nan"))
    got, pos = {}, 3  # odd offsets, gaps between the views
    for name, t in reversed(a.items()):
        got[name] = block[pos : pos + t.numel()].view(t.shape)
        pos += t.numel() + 5
    pool = ThreadPoolExecutor(2)
    with SafetensorsFile(path, pool=pool) as f:
        for name in a:
            f.get_slice(name).read_into(got[name])
        memory = numpy.empty((10, 9), dtype=numpy.float32)  # weakref-able, unlike storages
        own = torch.from_numpy(memory)
        f.get_slice("w1").narrow(0, 30, 10).read_into(own)
        f.wait()
        assert torch.equal(own, a["w1"][30:40])
        memory_ref = weakref.ref(memory)
        del own, memory
        # A pool thread drops its finished task (and the views it held) just after the
        # result is set: give it a moment, but the file itself must not keep them.
        deadline = time.monotonic() + 2.0
        while memory_ref() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert memory_ref() is None
    pool.shutdown()
    _assert_same(got, a)
    assert int(torch.isnan(block).sum()) == block.numel() - sum(t.numel() for t in a.values())


def _staged_cases(a: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """name -> (narrows, expected): whole tensors, row and column slices, a 3-D box."""
    cases = {name: ((), t) for name, t in a.items()}
    cases["rows"] = (((0, 3, 17),), a["rows"][3:20])
    cases["cols"] = (((1, 20, 30),), a["cols"][:, 20:50])
    cases["box"] = (((0, 1, 2), (2, 1, 4)), a["box"][1:3, :, 1:5])
    cases["cast"] = (((1, 5, 20),), a["cast"][:, 5:25].to(torch.bfloat16))  # cast on arrival
    cases["cast_whole"] = ((), a["cast_whole"].double())
    return cases


def _read_cases(files: list[str], cases: dict, device: str) -> dict[str, torch.Tensor]:
    got = {
        k: torch.full(want.shape, float("nan"), dtype=want.dtype, device=device)
        for k, (_, want) in cases.items()
    }
    for name, w in safetensors_weights_iterator(files):
        for dim, start, length in cases[name][0]:
            w = w.narrow(dim, start, length)
        w.read_into(got[name])
    return {k: v.cpu() for k, v in got.items()}


def _staged_checkpoint(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    a = {f"n{i:03d}": torch.randn(2, 16, generator=g) for i in range(100)}  # 128 B each
    a |= {k: torch.randn(40, 70, generator=g) for k in ("rows", "cols", "whole")}
    a["box"] = torch.randn(3, 4, 9, generator=g)
    a |= {k: torch.randn(20, 30, generator=g) for k in ("cast", "cast_whole")}
    path, _, _ = _write(tmp_path, "staged.safetensors", a)
    return path, a


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_staged_reads_through_the_pool(tmp_path, monkeypatch, large):
    """The way of a CUDA destination, checked on the CPU: reads queued on three threads
    through staging buffers of 1 KiB land intact (runs cut over buffers, column slices
    rearranged from whole rows, other dtypes cast; with every tensor counted large,
    column slices copied into the buffers out of mappings); small tensors stored back
    to back share a buffer, one preadv per buffer."""
    if large:
        monkeypatch.setattr(reader, "_SMALL_TENSOR_BYTES", 0)
    monkeypatch.setattr(staging, "STAGE_CPU_READS", True)
    monkeypatch.setattr(staging, "STAGE_BYTES", 1024)
    monkeypatch.setattr(reader, "_TASK_BYTES", 4096)
    monkeypatch.setenv("VLLM_LOAD_THREADS", "3")
    path, a = _staged_checkpoint(tmp_path)
    cases = _staged_cases(a)
    reads = []  # (offset, bytes)
    original = staging.preadv_fully
    monkeypatch.setattr(
        staging,
        "preadv_fully",
        lambda fd, views, offset, path: (
            reads.append((offset, sum(map(len, views)))) or original(fd, views, offset, path)
        ),
    )
    got = _read_cases([path], cases, "cpu")
    for name, (_, want) in cases.items():
        assert torch.equal(got[name], want), name
    header = read_header(path)
    small = [e for e in header.tensors if e.name.startswith("n")]
    start, end = small[0].start, small[-1].end
    assert end - start == 100 * 128  # stored back to back
    in_small = sorted(r for r in reads if start <= r[0] < end)
    assert len(in_small) == 13  # 12800 bytes in 1 KiB buffers, not 100 reads
    assert sum(n for _, n in in_small) == end - start


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
@pytest.mark.parametrize("stage_bytes", [1024, None])
def test_read_into_cuda_tensors(tmp_path, monkeypatch, stage_bytes, large):
    """CUDA parameters get the checkpoint's exact values through pinned buffers and
    asynchronous copies: whole tensors, row and column slices, a 3-D box, casts to
    another dtype; with small buffers (many turns of each) and the real size; strided
    slices of small tensors rearranged on the device, of large ones on the host."""
    if large:
        monkeypatch.setattr(reader, "_SMALL_TENSOR_BYTES", 0)
    if stage_bytes:
        monkeypatch.setattr(staging, "STAGE_BYTES", stage_bytes)
    monkeypatch.setenv("VLLM_LOAD_THREADS", "3")
    path, a = _staged_checkpoint(tmp_path)
    cases = _staged_cases(a)
    got = _read_cases([path], cases, "cuda")
    for name, (_, want) in cases.items():
        assert torch.equal(got[name], want), name
    # Without a pool (``[:]`` and a plain file): on the device on return.
    with SafetensorsFile(path) as f:
        dst = torch.empty(40, 30, device="cuda")
        f.get_slice("cols").narrow(1, 20, 30).read_into(dst)
        assert torch.equal(dst.cpu(), a["cols"][:, 20:50])


def test_queued_read_error_surfaces_when_the_iterator_ends(tmp_path, monkeypatch):
    """A read that fails on a pool thread (file truncated meanwhile) is raised, naming
    the file, by the loop over the weights, not lost."""
    path, _, _ = _write(tmp_path, "t.safetensors", {"w": torch.randn(64, 64)})
    dst = torch.empty(64, 64)
    with pytest.raises(ShardFileError, match="t.safetensors ended early"):
        for _, w in safetensors_weights_iterator([path]):
            os.truncate(path, os.path.getsize(path) - 100)
            copy_weight(dst, w)


# ---------------------------------------------------------------------------------------
# The default loader, end to end


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from vllm.testing import make_model

    return make_model("llama", str(tmp_path_factory.mktemp("llama")), vocab_size=256)


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_default_loader_logs_bytes_read(tiny_llama, caplog, monkeypatch, staged):
    """LLM(...) logs "Loading weights took ..., read ... GB at ... GB/s"; at TP=1 the
    bytes it reports are the checkpoint's tensor data, each byte read once. ``staged``:
    the reads go the way of a CUDA model's (staging buffers)."""
    from vllm import LLM

    monkeypatch.setattr(staging, "STAGE_CPU_READS", staged)

    reported = []
    original = base_loader.log_weights_loaded

    def spy(start, nbytes):
        reported.append(nbytes)
        return original(start, nbytes)

    monkeypatch.setattr(base_loader, "log_weights_loaded", spy)
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="vllm"):
        llm = LLM(model=tiny_llama, dtype="float32")
    # One record may reach caplog twice (pytest >= 9.2 also hooks the named logger).
    records = {id(r): r for r in caplog.records}.values()
    lines = [r.getMessage() for r in records if "Loading weights took" in r.getMessage()]
    assert len(lines) == 1
    assert re.fullmatch(
        r"Loading weights took \d+\.\d\d seconds, read \d+\.\d\d GB at \d+\.\d\d GB/s", lines[0]
    )
    header = read_header(os.path.join(tiny_llama, "model.safetensors"))
    assert reported == [header.size - header.data_start]
    # The weights arrived intact: compare a few parameters with the checkpoint.
    state = load_file(os.path.join(tiny_llama, "model.safetensors"))
    model = llm.llm_engine.model_executor.driver_worker.model
    # Linear weights may be packed for the CPU (mkldnn) after loading: compare them dense.
    params = {k: (p.to_dense() if p.is_mkldnn else p).cpu() for k, p in model.named_parameters()}
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]:
        assert torch.equal(params[name], state[name]), name
    prefix = "model.layers.1.self_attn."
    qkv = torch.cat([state[prefix + p + "_proj.weight"] for p in "qkv"])
    assert torch.equal(params[prefix + "qkv_proj.weight"], qkv)


def _with_header(path, edit) -> None:
    """Rewrite a safetensors file's header JSON in place, keeping its data bytes."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_null_metadata_reads_as_safetensors_reads_it(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.ones(2)}, path)
    _with_header(path, lambda header: header.update({"__metadata__": None}))
    with safe_open(path, "pt") as f:
        assert f.get_tensor("a").tolist() == [1.0, 1.0]
    assert [e.name for e in read_header(path).tensors] == ["a"]


@pytest.mark.parametrize("case", ["overlap", "gap-at-start", "negative-dim"])
def test_header_offsets_must_tile_the_data(tmp_path, case):
    """What the safetensors library refuses, read_header refuses too: here a tensor whose
    offsets point at another tensor's bytes (an HF q_proj read as its o_proj)."""
    path = str(tmp_path / "m.safetensors")
    save_file({k: torch.full((2, 2), float(i)) for i, k in enumerate("abc")}, path)

    def edit(header):
        if case == "overlap":
            header["b"]["data_offsets"] = header["a"]["data_offsets"]
        elif case == "gap-at-start":
            header.pop("a")
        else:
            header["c"]["shape"] = [-2, -2]

    _with_header(path, edit)
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type varies
        with safe_open(path, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(ShardFileError, match=str(path)):
        read_header(path)


def test_disk_full_error_names_the_file():
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    import errno

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError, match="Cannot write /dev/full: No space left") as info:
        write_file("/dev/full", [("w", torch.ones(4096))])
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"
