"""Safetensors files read and written directly, without a long-lived memory map.

Writing streams each tensor's bytes once, in large writes, and computes the file's
CRC-32 on the way. ``read_header`` parses and checks a header, so a truncated or
inconsistent file is named before any data is read. ``SafetensorsFile`` reads tensors, or
slices of them, straight into their destination tensors (the default loader; a strided
slice is copied out of a mapping that lasts only for that copy);
``parallel_reader`` reads whole files with several threads (the sharded-state loader).

The files are standard safetensors (8-byte little-endian header length, JSON header,
data), readable by ``safetensors.safe_open`` and by upstream vLLM.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch
from zlib_ng import zlib_ng

# safetensors dtype codes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a header (safetensors itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Largest single write: Linux moves at most ~2 GiB per call; smaller chunks let the
# checksum of one chunk overlap the write of the next.
_WRITE_CHUNK = 64 << 20
IOV_MAX = 1024  # buffers per writev/preadv call (Linux's limit)
# A SafetensorsFile hands its pool tasks of about this size: big reads are cut, small
# ones gathered (one task per tensor cost 2-3x the whole load for 11k small tensors),
# adjacent small ones into one preadv.
_TASK_BYTES = 16 << 20
# A strided slice (a row-parallel rank's columns) of a tensor up to this size is copied
# out of the whole tensor read into a scratch buffer: setting up and tearing down a
# mapping costs ~150 us, more than reading the other ranks' columns too. Where rows are
# shorter than a page, the rank's columns touch every page of the tensor anyway.
_SMALL_TENSOR_BYTES = 1 << 20
_scratch = threading.local()
# Reads bound for a CUDA tensor go through pinned host buffers of this size (CudaStaging).
STAGE_BYTES = 16 << 20
# Tests set this to send reads into CPU tensors the way of CUDA ones (``stage_run``,
# ``stage_box``), so that path is checked without a GPU.
_STAGE_CPU_READS = False
# Written files' data starts at a multiple of this (the header is padded with spaces).
PAGE_SIZE = mmap.PAGESIZE


class ShardFileError(ValueError):
    """A shard file is missing, truncated, corrupt, or does not match the model."""


Box = tuple[tuple[int, int], ...]  # a tensor's (start, end) along each dim
# How to read bytes as a tensor and which box of it to take: (dtype, shape, box).
Arrange = tuple[torch.dtype, tuple[int, ...], Box]


class TensorEntry(NamedTuple):  # a NamedTuple: built per tensor, 4x cheaper than a dataclass
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def small(self) -> bool:
        """Whether a strided slice of it is taken from the whole tensor read, not through
        a mapping of its pages (``_SMALL_TENSOR_BYTES``)."""
        return self.end - self.start <= _SMALL_TENSOR_BYTES


@dataclass(frozen=True)
class FileHeader:
    path: str
    data_start: int  # 8 + header length
    size: int  # bytes on disk
    tensors: tuple[TensorEntry, ...]  # in file order


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32' (the spelling the manifest uses)."""
    return str(dtype).removeprefix("torch.")


def read_header_json(path: str) -> tuple[dict, int, int]:
    """A safetensors file's header as parsed JSON, with its data start (8 + header length)
    and the file's size; raises ShardFileError naming ``path``. Only the JSON is checked."""
    raw, data_start, size = read_header_bytes(path)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as e:
        raise ShardFileError(f"{path} has a corrupt safetensors header ({e}).") from e
    return header, data_start, size


def read_header_bytes(path: str) -> tuple[bytes, int, int]:
    """A safetensors file's header (its JSON text with the padding), its data start and
    the file's size; raises ShardFileError naming ``path``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ShardFileError(
                    f"{path} is truncated: {size} bytes, too short for a safetensors header."
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise ShardFileError(
                    f"{path} is truncated or not a safetensors file: its header length field "
                    f"says {n} bytes, the file has {size}."
                )
            raw = f.read(n)
    except OSError as e:
        raise ShardFileError(f"Cannot read shard file {path}: {e}") from e
    if len(raw) < n:
        raise ShardFileError(f"{path} is truncated: it ends inside its header.")
    return raw, 8 + n, size


def read_header(path: str) -> FileHeader:
    """Parse and check a safetensors header; raises ShardFileError naming ``path``."""
    header, data_start, size = read_header_json(path)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and (
                not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())
            ):
                raise ShardFileError(
                    f"{path}: __metadata__ must map names to strings, got {info!r:.80}."
                )
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFileError(f"{path}: bad header entry for {name!r}: {info!r} ({e}).") from e
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0 or any(d < 0 for d in shape):
            raise ShardFileError(
                f"{path}: header entry {name!r} spans bytes [{begin}, {end}), which does not "
                f"fit shape {list(shape)} of {info['dtype']}."
            )
        entries.append(TensorEntry(name, dtype, shape, data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.start, e.end))
    # As the safetensors library: the tensors tile the data section, in order, with no
    # overlap (two names for the same bytes) and no gap.
    data_end = data_start
    for e in entries:
        if e.start != data_end:
            raise ShardFileError(
                f"{path}: header entry {e.name!r} starts at data byte {e.start - data_start}, "
                f"but the tensors before it end at {data_end - data_start}: tensors must "
                "cover the data section in order, without overlap or gap."
            )
        data_end = e.end
    if data_end != size:
        what = "truncated" if data_end > size else "longer than its header describes"
        raise ShardFileError(
            f"{path} is {what}: its header describes {data_end} bytes, the file has {size}."
        )
    return FileHeader(path, data_start, size, tuple(entries))


def plan_layout(
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, dict], int]:
    """Where ``write_file`` puts each tensor: (the tensors in file order, the header
    entries without ``__metadata__``, the data bytes).

    Tensors are laid out by element size, largest first (stable), so every tensor is
    aligned to its element size with no gap between tensors (safetensors allows none).
    """
    items = sorted(tensors, key=lambda kv: -kv[1].element_size())
    header: dict[str, dict] = {}
    offset = 0
    for name, t in items:
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"Cannot save {name!r}: dtype {t.dtype} has no safetensors code.")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    return items, header, offset


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.is_mkldnn:  # a weight packed for the CPU: dense again, one tensor at a time
        t = t.to_dense()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The part of ``views`` left after ``n`` bytes were transferred."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views


def _writev_fully(fd: int, views: list[memoryview]) -> None:
    while views:
        views = _advance(views, os.writev(fd, views))


def preadv_fully(fd: int, views: list[memoryview], offset: int, path: str) -> int:
    """Fill ``views`` with the file's bytes from ``offset`` on, retrying short reads;
    returns the bytes read. A file that ends first raises ShardFileError naming ``path``."""
    views = [v for v in views if len(v)]
    total = sum(len(v) for v in views)
    done = 0
    while views:
        n = os.preadv(fd, views, offset + done)
        if n <= 0:
            raise ShardFileError(
                f"{path} ended early at byte {offset + done} (truncated while being read?)."
            )
        done += n
        views = _advance(views, n)
    return total


def _crc32_many(views: list[memoryview], crc: int) -> int:
    for view in views:
        crc = zlib_ng.crc32(view, crc)
    return crc


def header_json(header: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    """The JSON text ``write_file`` writes for ``header`` (``plan_layout``'s entries),
    before its padding."""
    return json.dumps(
        {**header, "__metadata__": {"format": "pt", **(metadata or {})}}, separators=(",", ":")
    ).encode()


def _runs(items: list[tuple[str, torch.Tensor]]) -> Iterator[memoryview]:
    """The tensors' bytes in file order, tensors adjacent in one CPU storage merged into
    one view: a model laid out as the file is (``weight_region``) is a single view."""
    run: torch.Tensor | None = None  # a plain tensor's storage, from ``start`` on
    start = end = 0
    for _, t in items:
        plain = t.device.type == "cpu" and not t.is_mkldnn and t.is_contiguous()
        if plain and run is not None and t.data_ptr() == end:
            storage = t.untyped_storage()
            if storage.data_ptr() == run.untyped_storage().data_ptr():
                end += t.numel() * t.element_size()
                continue
        if run is not None:
            yield _storage_bytes(run, start, end)
            run = None
        if plain:
            run, start = t, t.data_ptr()
            end = start + t.numel() * t.element_size()
        else:
            yield _as_bytes(t)
    if run is not None:
        yield _storage_bytes(run, start, end)


def _storage_bytes(t: torch.Tensor, start: int, end: int) -> memoryview:
    """Bytes [start, end) (addresses) of ``t``'s storage."""
    storage = t.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8).set_(
        storage, start - storage.data_ptr(), (end - start,)
    )
    return memoryview(flat.numpy())


def _write_groups(views: Iterable[memoryview]) -> Iterator[list[memoryview]]:
    """``views`` as groups of about _WRITE_CHUNK bytes (at most IOV_MAX buffers): one
    writev each, however small the pieces are."""
    group: list[memoryview] = []
    size = 0
    for data in views:
        for start in range(0, len(data), _WRITE_CHUNK):
            piece = data[start : start + _WRITE_CHUNK]
            group.append(piece)
            size += len(piece)
            if size >= _WRITE_CHUNK or len(group) == IOV_MAX:
                yield group
                group, size = [], 0
    if group:
        yield group


def write_file(
    path: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    checksum: bool = True,
) -> tuple[int, int | None]:
    """Write ``tensors`` as a safetensors file; returns (size in bytes, CRC-32 of the file,
    or None without ``checksum``).

    Tensors are laid out by ``plan_layout``; tensors adjacent in memory are written as
    one piece (see ``write_raw``).
    """
    items, header, _ = plan_layout(tensors)
    return write_raw(path, header_json(header, metadata), _runs(items), checksum)


def write_raw(
    path: str, header: bytes, data: Iterable[memoryview], checksum: bool = True
) -> tuple[int, int | None]:
    """Write a safetensors file from its header's JSON text (``header_json``) and its data
    bytes in order; returns (size in bytes, CRC-32 of the file, or None).

    The header is padded with spaces so the data starts at a multiple of ``PAGE_SIZE``:
    every tensor is aligned to its element size (mmap-based readers need that), and the
    data can be mapped in one piece over memory laid out the same way
    (``weight_region``). The bytes go to the file in large writes while another thread
    computes the CRC-32 of the same bytes (zlib-ng's SIMD crc32, ~10 GB/s; both release
    the GIL), so the checksum costs little time.
    """
    header += b" " * (-(8 + len(header)) % PAGE_SIZE)
    prefix = struct.pack("<Q", len(header)) + header
    crc = zlib_ng.crc32(prefix) if checksum else None
    size = len(prefix)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _writev_fully(fd, [memoryview(prefix)])
        with ThreadPoolExecutor(1, thread_name_prefix="crc32") as hasher:
            for group in _write_groups(data):
                pending = hasher.submit(_crc32_many, group, crc) if checksum else None
                _writev_fully(fd, group)
                size += sum(len(v) for v in group)
                if pending is not None:
                    crc = pending.result()
        os.fsync(fd)
    except OSError as e:
        if e.filename is not None:
            raise
        # os.writev and os.fsync name no file: a full disk would say only "No space left".
        raise OSError(e.errno, f"Cannot write {path}: {e.strerror}", path) from e
    finally:
        os.close(fd)
    return size, crc


_MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python 3.11's mmap module


def map_file(header: FileHeader) -> dict[str, torch.Tensor]:
    """Map the file's tensors into memory (private, copy-on-write), page tables filled.

    The tensors share the page cache's pages: no copy, no new memory, and the file's
    pages stay mapped until the last tensor is gone. A write to a tensor copies just that
    page. Tensors whose offset is not a multiple of their element size are left out.
    The file must not be truncated or rewritten in place while mapped (reading a page
    of a truncated file raises SIGBUS); ``save_sharded_state`` never does that, it swaps
    in new files.
    """
    fd = open_for_read(header.path)
    try:
        mapped = mmap.mmap(fd, header.size, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
    finally:
        os.close(fd)  # the mapping keeps the file open
    mapped.madvise(mmap.MADV_WILLNEED)  # read ahead the whole file if it is not cached
    try:
        mapped.madvise(_MADV_POPULATE_READ)  # map every page now, not on first touch
    except OSError:
        pass  # an older kernel: pages are mapped on first touch instead
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    typed: dict[torch.dtype, torch.Tensor] = {}  # the whole file as each dtype it holds
    out = {}
    for e in header.tensors:  # one as_strided per tensor: ~3x cheaper than slice + views
        size = e.dtype.itemsize
        if e.start % size:
            continue
        if e.dtype not in typed:
            typed[e.dtype] = data[: len(data) - len(data) % size].view(e.dtype)
        out[e.name] = typed[e.dtype].as_strided(
            e.shape, _contiguous_strides(e.shape), e.start // size
        )
    return out


def _box_reads(
    offset: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    box: Box,
    dst: torch.Tensor,
    on_host: bool,
) -> Iterator[StagedRead]:
    """Staged reads that put ``box`` of the tensor stored at ``offset`` into ``dst``, each
    for as many indices of the first dim as fit a staging buffer: their whole rows (the
    box is taken on the device), or with ``on_host`` the box of those rows (taken on the
    host out of a mapping). Where one index does not fit, each index's own box."""
    row = dtype.itemsize * math.prod(shape[1:])  # file bytes per index of the first dim
    staged = dst.element_size() * math.prod(dst.shape[1:]) if on_host else row
    a, b = box[0]
    if staged > STAGE_BYTES:
        for i in range(a, b):
            sub = dst[i - a]
            yield from _box_reads(offset + i * row, dtype, shape[1:], box[1:], sub, on_host)
        return
    step = STAGE_BYTES // max(staged, 1)
    for r in range(a, b, step):
        n = min(step, b - r)
        arrange = (dtype, (n, *shape[1:]), ((0, n), *box[1:]))
        yield StagedRead(offset + r * row, n * row, dst[r - a : r - a + n], arrange, on_host)


def copy_out(
    src: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], box: Box, dst: torch.Tensor
) -> None:
    """``dst.copy_(box of the tensor of dtype and shape whose bytes src holds)``."""
    src = src.view(dtype).view(shape)
    for dim, (a, b) in enumerate(box):
        src = src.narrow(dim, a, b - a)
    dst.copy_(src)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def open_for_read(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ShardFileError(f"Cannot read shard file {path}: {e}") from e


class StagedRead(NamedTuple):
    """A read bound for a device, through a staging buffer."""

    offset: int  # file bytes [offset, offset + size)
    size: int
    dst: torch.Tensor
    # None: the bytes as they are into dst (a uint8 view); else how to view them and
    # which box of them goes to dst: taken on the device, or on the host (``on_host``,
    # out of a mapping of the bytes, into the staging buffer; the bytes are not read).
    arrange: Arrange | None = None
    on_host: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes it reads (a mapped read: the box's)."""
        return self.dst.nbytes if self.on_host else self.size


class CudaStaging(threading.local):
    """Each thread's way from a file to a CUDA device: two pinned host buffers of
    ``STAGE_BYTES`` used in turn and a stream of its own, so a thread reads into one
    buffer while the copy out of the other runs (``copy(..., non_blocking=True)`` from
    pinned memory does not wait for the device). Whoever copies on these streams
    synchronizes the device before the destinations are used.

    For a CPU device (tests of the read plans without a GPU) the buffers are plain
    memory and the copies synchronous."""

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.buffers: list[torch.Tensor] = []
        self.events: list = []
        self.stream = None
        self.turn = 0
        self.scratch: torch.Tensor | None = None  # device bytes, for copies that rearrange

    def buffer(self, device: torch.device) -> torch.Tensor:
        """This thread's next buffer for ``device``, once its last copy has finished."""
        if device != self.device:
            if self.stream is not None:
                self.stream.synchronize()  # the old buffers' copies, before they go
            cuda = device.type == "cuda"
            self.buffers = [torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=cuda)
                            for _ in range(2)]  # fmt: skip
            self.events = [torch.cuda.Event() for _ in range(2)] if cuda else []
            self.stream = torch.cuda.Stream(device) if cuda else None
            if cuda:
                # Streams are unordered: the copies start after what the default stream
                # has queued (e.g. the model's construction initialising a parameter).
                self.stream.wait_stream(torch.cuda.default_stream(device))
            self.device, self.turn, self.scratch = device, 0, None
        if self.events:
            self.events[self.turn].synchronize()
        return self.buffers[self.turn]

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``dst.copy_(src)`` for each pair on this thread's stream, every ``src`` in the
        buffer ``buffer()`` last returned; it is handed out again once they are done."""
        with torch.cuda.stream(self.stream):  # None: the CPU, nothing to switch
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            if self.events:
                self.events[self.turn].record(self.stream)
        self.turn ^= 1

    def copy_rearranged(self, src: torch.Tensor, arrange: Arrange, dst: torch.Tensor) -> None:
        """``dst.copy_(box of the tensor whose bytes src holds)``, ``src`` in the buffer
        ``buffer()`` last returned: the bytes go to the device as they are, into a device
        buffer of this thread, and the box is copied out of that on the device."""
        if self.stream is None:
            copy_out(src, *arrange, dst)
            self.turn ^= 1
            return
        if self.scratch is None:
            with torch.cuda.stream(self.stream):  # its memory belongs to this stream
                self.scratch = torch.empty(STAGE_BYTES, dtype=torch.uint8, device=self.device)
        on_device = self.scratch[: len(src)]
        self.copy([(on_device, src)])
        with torch.cuda.stream(self.stream):  # after that copy; the next one waits for it
            copy_out(on_device, *arrange, dst)


# The pool threads' staging (a thread's buffers go with the thread).
_staging = CudaStaging()


class ReadStats:
    """Bytes read by the lazy slices of ``SafetensorsFile`` objects that share it."""

    def __init__(self) -> None:
        self.bytes_read = 0


class SafetensorsFile:
    """A safetensors file whose tensors are read on demand, only the part asked for.

    Like ``safetensors.safe_open(...).get_slice(name)``, without a lasting memory map:
    the bytes go straight from the file into the destination tensor
    (``TensorSlice.read_into``; a strided slice through a mapping of its tensor that is
    closed after the copy, or for a small tensor through a scratch buffer), so loading
    holds no file pages in the process's memory and no second copy. With a ``pool``,
    ``read_into`` queues its reads and returns: they go to the pool in tasks of about
    ``_TASK_BYTES``; ``wait()`` (or ``close()``) returns when they are done and raises
    the first read error.
    """

    def __init__(self, path: str, stats: ReadStats | None = None, pool: Executor | None = None):
        self.header = read_header(path)
        self.path = path
        self.stats = stats or ReadStats()
        self.pool = pool
        self._pending: list[Future] = []
        # The task being gathered: file runs and mapped copies, and their bytes.
        self._runs: list[tuple[int, memoryview]] = []
        self._copies: list[tuple[TensorEntry, tuple, torch.Tensor]] = []
        self._staged: list[StagedRead] = []  # reads bound for a CUDA tensor
        self._gathered = 0
        self._devices: set[torch.device] = set()  # where staged copies went
        self._entries = {e.name: e for e in self.header.tensors}
        # Byte views of the destinations' storages, by address: one per storage, sliced
        # per tensor (a model in its weight block has one storage for every parameter).
        self._storage_views: dict[int, memoryview] = {}
        self.fd = open_for_read(path)

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_slice(self, name: str) -> TensorSlice:
        entry = self._entries[name]
        whole = tuple((0, d) for d in entry.shape)
        return TensorSlice(self, entry, whole, whole)

    def byte_view(self, dst: torch.Tensor) -> memoryview:
        """The bytes of ``dst`` (a contiguous CPU tensor) as a memoryview that keeps its
        storage alive. A storage that holds more than ``dst`` (a model's weight block)
        gets one view, kept until ``close()`` and sliced for each of its tensors: a tenth
        of the cost of going through ``dst.numpy()``, which matters for 10k tensors."""
        storage = dst.untyped_storage()
        base, size = storage.data_ptr(), storage.nbytes()
        if size == dst.nbytes:  # a tensor of its own storage: its view is not kept
            return _storage_bytes(dst, base, base + size)
        view = self._storage_views.get(base)
        if view is None:
            view = self._storage_views[base] = _storage_bytes(dst, base, base + size)
        start = dst.data_ptr() - base
        return view[start : start + dst.nbytes]

    def read_run(self, offset: int, view: memoryview, wait: bool = False) -> None:
        """Read ``len(view)`` bytes at file ``offset`` into ``view``; queued for the pool
        unless ``wait``."""
        self.stats.bytes_read += len(view)
        if self.pool is None or wait:
            self._read([(offset, view)])
            return
        for start in range(0, len(view), _TASK_BYTES):  # a big run over several tasks
            piece = view[start : start + _TASK_BYTES]
            self._runs.append((offset + start, piece))
            self._gather(len(piece))

    def copy_box(self, entry: TensorEntry, box: Box, dst: torch.Tensor, wait: bool) -> None:
        """Copy ``box`` of ``entry`` (not one run of the file) into ``dst`` with one
        strided copy (queued for the pool unless ``wait``): out of a private mapping of
        the tensor's pages, gone on return; or, for a tensor of at most
        ``_SMALL_TENSOR_BYTES``, out of the whole tensor read into a scratch buffer."""
        self.stats.bytes_read += entry.end - entry.start if entry.small else dst.nbytes
        if self.pool is None or wait:
            self._copy_box(entry, box, dst)
        else:
            self._copies.append((entry, box, dst))
            self._gather(dst.nbytes)

    def stage_run(self, offset: int, dst: torch.Tensor, wait: bool = False) -> None:
        """Read ``dst.numel()`` bytes at file ``offset`` into ``dst``, a 1-D uint8 tensor on
        a CUDA device, through pinned buffers (``CudaStaging``); queued for the pool
        unless ``wait``."""
        n = dst.numel()
        reads = [StagedRead(offset + a, min(STAGE_BYTES, n - a), dst[a : a + STAGE_BYTES])
                 for a in range(0, n, STAGE_BYTES)]  # fmt: skip
        self._stage(reads, dst.device, wait)

    def stage_box(
        self, entry: TensorEntry, box: Box, dst: torch.Tensor, strided: bool, wait: bool = False
    ) -> None:
        """Copy ``box`` of ``entry`` into ``dst``, a contiguous tensor on a CUDA device (of
        any dtype) through pinned buffers. The rows of the first dim that the box spans
        go to the device, where the box is copied out of them (and cast); but a
        ``strided`` box (not one run of the file) of a tensor of more than
        ``_SMALL_TENSOR_BYTES`` is copied into the buffers out of a mapping of those
        rows, so only the box's pages are read (a row-parallel rank's columns)."""
        on_host = strided and not entry.small
        reads = list(_box_reads(entry.start, entry.dtype, entry.shape, box, dst, on_host))
        self._stage(reads, dst.device, wait)

    def _stage(self, reads: list[StagedRead], device: torch.device, wait: bool) -> None:
        self._devices.add(device)
        for read in reads:
            self.stats.bytes_read += read.nbytes
        if self.pool is None or wait:
            staging = CudaStaging()  # gone on return: no pinned memory kept by this thread
            self._run_staged(reads, staging)
            if staging.stream is not None:
                staging.stream.synchronize()
            return
        for read in reads:
            self._staged.append(read)
            self._gather(read.nbytes)

    def _run_staged(self, reads: list[StagedRead], staging: CudaStaging) -> None:
        """One preadv into a staging buffer per read, or per run of reads that follow each
        other in the file and fit one buffer together, or a copy out of a mapping; then
        the copies to the device."""
        i = 0
        while i < len(reads):
            read = reads[i]
            group = [read]
            nbytes = read.size
            i += 1
            while read.arrange is None and i < len(reads):
                nxt = reads[i]
                follows = nxt.arrange is None and nxt.offset == read.offset + nbytes
                fits = nbytes + nxt.size <= STAGE_BYTES and nxt.dst.device == read.dst.device
                if not (follows and fits):
                    break
                group.append(nxt)
                nbytes += nxt.size
                i += 1
            if read.on_host:
                buf = staging.buffer(read.dst.device)[: read.dst.nbytes]
                host = buf.view(read.dst.dtype).view(read.dst.shape)
                self._copy_mapped(read.offset, read.offset + read.size, read.arrange, host)
                staging.copy([(read.dst, host)])
                continue
            buf = staging.buffer(read.dst.device)[:nbytes]
            preadv_fully(self.fd, [memoryview(buf.numpy())], read.offset, self.path)
            if read.arrange is not None:
                staging.copy_rearranged(buf, read.arrange, read.dst)
                continue
            pairs, pos = [], 0
            for r in group:
                pairs.append((r.dst, buf[pos : pos + r.size]))
                pos += r.size
            staging.copy(pairs)

    def _gather(self, nbytes: int) -> None:
        self._gathered += nbytes
        if self._gathered >= _TASK_BYTES or len(self._runs) >= IOV_MAX:
            self.submit()

    def submit(self) -> None:
        """Hand the reads and copies gathered so far to the pool (``wait`` does too)."""
        if self._runs or self._copies or self._staged:
            runs, copies, staged = self._runs, self._copies, self._staged
            self._runs, self._copies, self._staged, self._gathered = [], [], [], 0
            self._pending.append(self.pool.submit(self._run_task, runs, copies, staged))

    def _run_task(self, runs: list[tuple[int, memoryview]], copies: list, staged: list) -> None:
        self._read(runs)
        for entry, box, dst in copies:
            self._copy_box(entry, box, dst)
        if staged:
            self._run_staged(staged, _staging)

    def _copy_box(self, entry: TensorEntry, box: Box, dst: torch.Tensor) -> None:
        if entry.small:
            nbytes = entry.end - entry.start
            scratch = getattr(_scratch, "buffer", None)
            if scratch is None:  # one per thread, shared by all files; gone with the thread
                scratch = _scratch.buffer = torch.empty(_SMALL_TENSOR_BYTES, dtype=torch.uint8)
            src = scratch[:nbytes]
            preadv_fully(self.fd, [memoryview(src.numpy())], entry.start, self.path)
            copy_out(src, entry.dtype, entry.shape, box, dst)
            return
        self._copy_mapped(entry.start, entry.end, (entry.dtype, entry.shape, box), dst)

    def _copy_mapped(self, start: int, end: int, arrange: Arrange, dst: torch.Tensor) -> None:
        """``copy_out`` of file bytes [start, end) through a private mapping of their
        pages, closed on return: only the pages the box touches are read."""
        first = start - start % mmap.PAGESIZE
        mapped = mmap.mmap(self.fd, end - first, offset=first, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        try:
            copy_out(torch.frombuffer(mapped, dtype=torch.uint8)[start - first :], *arrange, dst)
        finally:
            mapped.close()  # the views of it are gone with copy_out's frame

    def _read(self, runs: list[tuple[int, memoryview]]) -> None:
        """Runs that follow each other in the file (tensors stored back to back) are
        read with one preadv into their several buffers."""
        runs = sorted(runs, key=lambda r: r[0])
        i = 0
        while i < len(runs):
            offset, views, end = runs[i][0], [runs[i][1]], runs[i][0] + len(runs[i][1])
            i += 1
            while i < len(runs) and runs[i][0] == end and len(views) < IOV_MAX:
                views.append(runs[i][1])
                end += len(runs[i][1])
                i += 1
            preadv_fully(self.fd, views, offset, self.path)

    def wait(self) -> None:
        if self.pool is not None:
            self.submit()
        pending, self._pending = self._pending, []
        futures.wait(pending)  # all of them, so none still reads after an error
        for device in self._devices:  # the pool threads' copies, on their own streams
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        self._devices.clear()
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._storage_views.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorSlice:
    """A box of a tensor in a ``SafetensorsFile``: ``narrow`` it, then ``read_into`` a
    tensor (or index it, ``[:]``, for a new tensor). A box that is one run of the file is
    one read of exactly its bytes; any other (e.g. a column range of every row) is one
    strided copy out of a short-lived mapping of the tensor's pages, or, for a tensor of
    at most 1 MiB, out of the whole tensor read into a scratch buffer.

    A load makes a few of these per tensor, so their methods keep to plain Python."""

    def __init__(self, file: SafetensorsFile, entry: TensorEntry, box: Box, whole: Box):
        self.file = file
        self.entry = entry
        self.box = box  # (start, end) per dim
        self.whole = whole  # the box of the whole tensor
        self.dtype = entry.dtype
        self.shape = tuple(b - a for a, b in box)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> TensorSlice:
        a, b = self.box[dim]
        if start < 0 or length < 0 or a + start + length > b:
            raise IndexError(
                f"narrow({dim}, {start}, {length}) is out of range for {self.entry.name} "
                f"with shape {self.get_shape()}."
            )
        box = list(self.box)
        box[dim] = (a + start, a + start + length)
        return TensorSlice(self.file, self.entry, tuple(box), self.whole)

    def __getitem__(self, index) -> torch.Tensor:
        if not isinstance(index, tuple):
            index = (index,)
        if index and index[-1] is Ellipsis:
            index = index[:-1]
        view = self
        for dim, s in enumerate(index):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise TypeError(f"TensorSlice takes ranges (start:stop), got {index!r}.")
            start, stop, _ = s.indices(view.shape[dim])
            view = view.narrow(dim, start, max(0, stop - start))
        out = torch.empty(view.shape, dtype=self.dtype)
        view.read_into(out, wait=True)
        return out

    def reads_into(self, dst: torch.Tensor) -> bool:
        """Whether ``read_into`` takes ``dst`` (of any shape): a contiguous tensor on the
        CPU of the slice's dtype, or on a CUDA device of any dtype."""
        staged = dst.is_cuda or (dst.is_cpu and _STAGE_CPU_READS)
        return dst.is_contiguous() and (staged or (dst.is_cpu and dst.dtype == self.dtype))

    def read_into(self, dst: torch.Tensor, wait: bool = False) -> None:
        """Read the box into ``dst``: a contiguous tensor of its shape, on the CPU of its
        dtype, or on a CUDA device of any dtype (through pinned buffers, ``CudaStaging``;
        another dtype is cast on the device). If the file has a pool, the bytes are in
        place after its ``wait()``, else (or with ``wait``) on return."""
        if not self.reads_into(dst):
            raise ValueError(
                "read_into needs a contiguous tensor: on the CPU of the slice's dtype "
                f"({self.dtype}), or on a CUDA device; got {dst.dtype} on {dst.device}."
            )
        if dst.shape != self.shape:
            raise ValueError(f"read_into: {list(dst.shape)} != slice {self.get_shape()}.")
        staged = not dst.is_cpu or _STAGE_CPU_READS
        file, entry, box = self.file, self.entry, self.box
        if file.fd < 0:
            raise ShardFileError(f"{file.path} was closed before {entry.name} was read.")
        # The box is one contiguous run of the file when only the first dim is narrowed
        # (rows), or more generally when every dim before the last narrowed one has
        # length 1: one read straight into dst. Else it is many runs (e.g. a column range
        # of every row of a row-parallel weight), where a read per run would cost a
        # syscall and Python work per row: one strided copy instead.
        strided = False
        if box[1:] != self.whole[1:]:
            cut = max(i for i in range(len(box)) if box[i] != self.whole[i])
            strided = dst.numel() > 0 and any(b - a > 1 for a, b in box[:cut])
        if staged and (strided or dst.dtype != self.dtype):  # cast on the device
            file.stage_box(entry, box, dst, strided, wait=wait)
            return
        if strided:
            file.copy_box(entry, box, dst, wait=wait)
            return
        offset = entry.start
        for i, (a, _) in enumerate(box):  # the box's first element, row-major
            if a:
                offset += a * self.dtype.itemsize * math.prod(entry.shape[i + 1 :])
        if staged:
            file.stage_run(offset, dst.view(-1).view(torch.uint8), wait=wait)
        else:
            file.read_run(offset, file.byte_view(dst), wait=wait)
