"""File-level plumbing under ``torch.distributed.checkpoint`` (DCP): DCP plans (which rank stores which
tensor chunk, resharding at load), this module stores the bytes.

* ``ChecksumWriter`` (a DCP ``StorageWriter``) writes each rank's tensor chunks as their raw bytes into one
  file ``__R_0.distcp``, back to back, straight from the tensors' memory with positional writes on
  ``thread_count`` threads (``blockio``), computing one checksum (``checksum.ALGORITHM``, XXH3-64) per 4 MiB
  block on the fly; one fsync per file. Every stored item's ``_StorageInfo`` carries ``transform_descriptors=[RAW_FORMAT]``: a stock DCP
  reader refuses such a checkpoint (unknown extension) instead of misreading raw bytes as ``torch.save``
  records. ``writer.records`` maps each file this rank wrote to its checksum record
  ``{"bytes", "block", "checksum": "xxh3_64", "digests": [hex, ...]}`` (``checksum.make_record``).
* ``SafeReader`` (a DCP ``StorageReader``) reads ``.metadata`` (a pickle written by DCP) with an allow-list
  unpickler: only DCP's metadata dataclasses, ``torch.Size``, dtypes and layouts can be constructed;
  ``BytesStorageMetadata`` entries (which DCP would load with ``torch.load(weights_only=False)``) are
  refused. Raw-format data is read *into the destination tensors* (DCP's planner resolves each request to
  a view of the target) with positional reads on ``threads`` threads; a request that is not one contiguous
  byte range of the stored chunk, or a target that is not a contiguous CPU tensor of the stored dtype, goes
  through a scratch buffer + ``copy_``. Given the manifest's file ``records`` it verifies every block it
  reads against them while reading, with the algorithm each record names (older records: CRC-32)
  (``CorruptCheckpointError`` names the file, byte range and tensors).
  Checkpoints of the older ``torch.save`` shard format are read by DCP's own reader
  (``torch.load(weights_only=True)``).
* ``write_file_durable`` / ``fsync_dir`` / ``file_block_digests``: (temp-file +) fsync (+ rename), checksums
  (``fsync_dir`` and the temp-file write are :mod:`dist_train.atomic_write`'s, re-exported here).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import math
import os
import pickle
import threading
from pathlib import Path
from typing import Any, Generator, Optional, Sequence, Union

import torch
from torch.futures import Future
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystem, _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from dist_train.atomic_write import fsync_dir, write_bytes_atomic
from dist_train.checkpoint import blockio, checksum
from dist_train.checkpoint.blockio import BLOCK, Segment

PathLike = Union[str, os.PathLike]
RAW_FORMAT = "dist-train-raw/1"  # shard format marker (manifest "shard_format", each item's transform_descriptors)


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or unsafe to load, or a save failed; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """Verification failed: a file is missing, has the wrong size or bytes that do not match its checksums.
    ``problem`` is the one-line finding (the message may add which checkpoint it was found in)."""

    def __init__(self, message: str, problem: Optional[str] = None) -> None:
        super().__init__(message)  # args == (message,): pickles across ranks (DCP gathers exceptions)
        self.problem = problem or message


class CheckpointIOError(CheckpointError):
    """Reading a checkpoint failed with an I/O error that may pass (``transient_io``: EIO, ESTALE, a timeout on a
    network file system): nothing says its bytes are bad, so a resume neither falls back past it nor calls it
    damaged; the run fails as restartable."""


#: errnos of a read that may succeed when tried again (a network file system's server or link, a flaky device)
TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "ESTALE", "EAGAIN", "EINTR", "ETIMEDOUT", "EBUSY", "ENOLCK", "EREMOTEIO", "ECONNRESET", "ECONNABORTED",
    "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH") if hasattr(errno, name))


def transient_io(e: BaseException) -> bool:
    """True for an ``OSError`` whose errno is in ``TRANSIENT_ERRNOS``. A missing file (ENOENT) is not: the commit
    makes every file durable before the manifest that lists it, so a listed file that is absent was removed."""
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


def damage_message(path: PathLike, start: int, end: int, tensors: Sequence[str], algorithm: str) -> str:
    """``<path>: xxh3_64 checksum mismatch in bytes [start, end) (corrupt); tensors stored there: a, b and 3
    more``."""
    where = f"{algorithm} checksum mismatch in bytes [{start}, {end}) (corrupt)"
    names = sorted(set(tensors))
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        where += f"; tensor{'s' if len(names) > 1 else ''} stored there: {shown}"
    return f"{path}: {where}"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU tensor's memory (no copy; keeps the tensor alive)."""
    assert t.device.type == "cpu" and t.is_contiguous(), (t.device, t.stride())
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def narrow_box(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The view ``t[o0:o0+l0, o1:o1+l1, ...]``."""
    for d, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(d, o, n)
    return t


def box_byte_range(sizes: Sequence[int], offsets: Sequence[int], lengths: Sequence[int],
                   itemsize: int) -> Optional[tuple[int, int]]:
    """``(start, nbytes)`` of the sub-box ``offsets``/``lengths`` of a row-major chunk of shape ``sizes`` when
    it is one contiguous byte range (leading dims of length 1, then one partial dim, then full dims), else None."""
    k = 0
    while k < len(sizes) and lengths[k] == 1:
        k += 1
    if any(offsets[d] != 0 or lengths[d] != sizes[d] for d in range(k + 1, len(sizes))):
        return None
    stride, start = 1, 0
    for d in reversed(range(len(sizes))):
        start += offsets[d] * stride
        stride *= sizes[d]
    return start * itemsize, math.prod(lengths) * itemsize


def file_block_digests(path: PathLike, block: int = BLOCK, algorithm: str = checksum.ALGORITHM) -> dict:
    """The checksum record (``checksum.make_record``: one ``algorithm`` hex digest per ``block`` bytes) of a file.

    Per-block checksums (not one per file) let ``verify`` say *which bytes* are damaged and so name the
    tensor stored there; the cost is the same single pass over the data."""
    digests, size = [], 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            while n < block:  # short reads before EOF: fill the block so boundaries match the writer's
                m = f.readinto(view[n:])
                if not m:
                    break
                n += m
            digests.append(checksum.digest(view[:n], algorithm))
            size += n
    return checksum.make_record(size, block, digests, algorithm)


def bytes_block_digests(data: bytes, block: int = BLOCK) -> dict:
    """The checksum record of ``data`` (what ``file_block_digests`` gives for a file holding it)."""
    view = memoryview(data)
    return checksum.make_record(len(data), block, [checksum.digest(view[i:i + block])
                                                   for i in range(0, len(data), block)])


def write_file_durable(path: PathLike, data: bytes, atomic: bool = True) -> dict:
    """Write ``data`` to ``path`` and fsync it; return its checksum record. ``atomic``: via a temp file +
    rename + directory fsync. Files inside a save's ``step_N.tmp`` directory pass ``atomic=False``: the
    directory is fsynced once and renamed as a whole at commit, so a per-file rename and directory fsync
    would only add fsyncs (each a journal commit) to every save. Disk full in an atomic write: the old file stays as
    it was and no temp file is left behind (:mod:`dist_train.atomic_write`)."""
    if atomic:
        write_bytes_atomic(path, data, fsync=True)
    else:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return bytes_block_digests(data)


class _ChecksumStream(io.RawIOBase):
    """Write-only stream wrapper: forwards to ``raw`` and folds the written bytes into per-block checksums.

    DCP only appends (``write`` + ``tell``); a ``seek`` that is not a no-op marks the running checksums
    invalid and the file is re-read once at close instead, so the record is always right."""

    def __init__(self, raw: io.BufferedWriter, block: int = BLOCK) -> None:
        super().__init__()
        self._raw = raw
        self.block = block
        self.digests: list[str] = []
        self._hasher = checksum.new_hasher()
        self._fill = 0  # bytes in the current (unfinished) block
        self.size = 0
        self.valid = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self._raw.write(b)
        mv = memoryview(b).cast("B")
        pos = 0
        while pos < len(mv):
            take = min(len(mv) - pos, self.block - self._fill)
            self._hasher.update(mv[pos:pos + take])
            self._fill += take
            pos += take
            if self._fill == self.block:
                self.digests.append(self._hasher.hexdigest())
                self._hasher, self._fill = checksum.new_hasher(), 0
        self.size += len(mv)
        return n

    def record(self) -> dict:
        tail = [self._hasher.hexdigest()] if self._fill else []
        return checksum.make_record(self.size, self.block, self.digests + tail)

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        new = self._raw.seek(pos, whence)
        if new != self.size:
            self.valid = False
        return new

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()


class _ChecksumFileSystem(FileSystem):
    """DCP's local FileSystem, recording the checksum record of every file it creates, keyed by file name."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as s:
                yield s
            return
        path = Path(path)
        with open(path, mode) as raw:
            stream = _ChecksumStream(raw)
            yield stream
            raw.flush()
        rec = stream.record() if stream.valid else file_block_digests(path)
        with self._lock:
            self.records[path.name] = rec

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:  # DCP writes ".metadata.tmp" then renames it: move the record with it
            rec = self.records.pop(Path(path).name, None)
            if rec is not None:
                self.records[Path(new_path).name] = rec


def _item_nbytes(item: WriteItem) -> int:
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def _host_bytes(planner: SavePlanner, item: WriteItem, nbytes: int) -> memoryview:
    """The bytes of one write item, from the tensor itself when it is a contiguous CPU tensor (else one copy)."""
    t = planner.resolve_data(item)
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"'{item.index.fqn}' is {type(t).__name__}: only tensors are written to shards")
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg().to("cpu").contiguous()
    if t.dtype != item.tensor_data.properties.dtype or t.numel() * t.element_size() != nbytes:
        raise CheckpointError(f"'{item.index.fqn}': planned {nbytes} bytes of "
                              f"{item.tensor_data.properties.dtype}, got {tuple(t.shape)} {t.dtype}")
    return tensor_bytes(t)


class ChecksumWriter(FileSystemWriter):
    """DCP ``StorageWriter``: one raw-bytes file per rank, ``thread_count`` I/O threads, checksums while writing,
    fsync per file (see module doc). ``.metadata`` is written by DCP's ``finish`` through a checksum stream."""

    def __init__(self, path: PathLike, thread_count: int = 1) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count,
                         overwrite=True)
        self.fs = _ChecksumFileSystem()

    @property
    def records(self) -> dict[str, dict]:
        return dict(self.fs.records)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        segments, results, offset = [], [], 0
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise CheckpointError(f"'{item.index.fqn}' is not a tensor: only tensors go into shards "
                                      "(other values are stored as JSON)")
            n = _item_nbytes(item)
            segments.append(Segment(offset, n, functools.partial(_host_bytes, planner, item, n)))
            results.append(WriteResult(index=item.index, size_in_bytes=n,
                                       storage_data=_StorageInfo(name, offset, n, transform_descriptors=[RAW_FORMAT])))
            offset += n
        record = blockio.write_file(Path(self.path) / name, segments, offset, threads=self.thread_count)
        with self.fs._lock:
            self.fs.records[name] = record
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut


# ---------------------------------------------------------------------------------------------
# Safe metadata loading
# ---------------------------------------------------------------------------------------------
_DCP_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_MD, "Metadata"), (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "ChunkStorageMetadata"),
    (_DCP_MD, "TensorProperties"), (_DCP_MD, "MetadataIndex"), (_DCP_MD, "StorageMeta"),
    (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that can only build DCP metadata objects (plus torch dtypes); anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def is_plain_file_name(name: str) -> bool:
    """A file directly inside a directory: not empty, no separator, not ``.`` or ``..``."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def load_dcp_metadata(path: PathLike) -> dcp_metadata.Metadata:
    """Read a DCP ``.metadata`` file safely; raise ``CheckpointError`` naming the file when it is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({e})") from None
    if not isinstance(md, dcp_metadata.Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (got {type(md).__name__})")
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(f"{path}: entry '{fqn}' is {type(entry).__name__}; only tensors may be "
                                  "loaded (pickled objects are refused)")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", "")
        if not is_plain_file_name(rel):
            raise CheckpointError(f"{path}: storage file name {rel!r} is not a plain file name")
    return md


class SafeReader(FileSystemReader):
    """DCP ``StorageReader``: safe metadata (``load_dcp_metadata``), raw shards read into the targets on
    ``threads`` threads, verified against ``records`` (the manifest's ``files``) while reading when given."""

    def __init__(self, path: PathLike, records: Optional[dict[str, dict]] = None, threads: int = 1) -> None:
        super().__init__(path)
        self.records = records
        self.threads = threads
        self._chunks: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, ...], torch.dtype]] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        md = load_dcp_metadata(self._get_metadata_path(rank))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: dcp_metadata.Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._chunks = {(fqn, tuple(c.offsets)): (tuple(c.sizes), md.properties.dtype)
                        for fqn, md in metadata.state_dict_metadata.items() for c in md.chunks}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        raw = [RAW_FORMAT in (self.storage_data[r.storage_index].transform_descriptors or ()) for r in plan.items]
        if not any(raw):  # older torch.save shards: DCP's own reader (torch.load(weights_only=True))
            return super().read_data(plan, planner)
        if not all(raw):
            raise CorruptCheckpointError(f"{self.path}: .metadata mixes {RAW_FORMAT} and other shard formats")
        per_file: dict[str, dict[Any, list[ReadItem]]] = {}
        for r in plan.items:
            per_file.setdefault(self.storage_data[r.storage_index].relative_path, {}) \
                .setdefault(r.storage_index, []).append(r)
        # file by file: the scratch tensors of one file's requests (a target of another dtype than the stored one,
        # such as an evaluation's bf16 weights read from fp32 masters) live only until that file's copies, not the
        # whole load's: a rank reading every file of a ZeRO checkpoint holds one saver's part of the model at once
        for name, chunks in sorted(per_file.items()):
            segs: list[Segment] = []
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (target, source) after the file's reads
            commits: list[tuple[ReadItem, torch.Tensor]] = []
            for index, reqs in chunks.items():
                chunk_segs, chunk_copies, targets = self._plan_chunk(index, self.storage_data[index], reqs, planner)
                segs += chunk_segs
                copies += chunk_copies
                commits += zip(reqs, targets)
            self._read_file(name, segs)
            for target, source in copies:
                target.copy_(source)
            for req, target in commits:
                planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _plan_chunk(self, index: Any, info: _StorageInfo, reqs: list[ReadItem], planner: LoadPlanner
                    ) -> tuple[list[Segment], list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """Segments reading one stored chunk for ``reqs``: straight into each target when every request is
        a contiguous, disjoint byte range and the target a contiguous CPU tensor of the stored dtype; else
        via scratch tensors and (target, source) copies."""
        sizes, dtype = self._chunks[(index.fqn, tuple(index.offset))]
        if info.length != math.prod(sizes) * dtype.itemsize:
            raise CorruptCheckpointError(f"{Path(self.path) / info.relative_path}: '{index.fqn}' has "
                                         f"{info.length} bytes stored, its metadata says {list(sizes)} {dtype}")
        targets = []
        for r in reqs:
            t = planner.resolve_tensor(r).detach()
            if list(t.shape) != list(r.lengths):
                raise CheckpointError(f"'{index.fqn}': target shape {list(t.shape)}, request {list(r.lengths)}")
            targets.append(t)
        ranges = [box_byte_range(sizes, r.storage_offsets, r.lengths, dtype.itemsize) for r in reqs]
        spans = sorted(x for x in ranges if x is not None)
        disjoint = all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        segs, copies = [], []
        if None in ranges or not disjoint:  # read the whole stored chunk once, then narrow per request
            scratch = torch.empty(sizes, dtype=dtype)
            segs.append(Segment(info.offset, info.length, tensor_bytes(scratch)))
            copies = [(t, narrow_box(scratch, r.storage_offsets, r.lengths)) for r, t in zip(reqs, targets)]
            return segs, copies, targets
        for (start, nbytes), t in zip(ranges, targets):
            if t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous():
                view = tensor_bytes(t)
            else:
                scratch = torch.empty(t.shape, dtype=dtype)
                view = tensor_bytes(scratch)
                copies.append((t, scratch))
            segs.append(Segment(info.offset + start, nbytes, view))
        return segs, copies, targets

    def _read_file(self, name: str, segs: list[Segment]) -> None:
        path = Path(self.path) / name
        if self.records is None:
            try:
                blockio.read_file(path, segs, threads=self.threads)
            except EOFError as e:
                raise CorruptCheckpointError(str(e)) from None
            return
        rec = self.records.get(name)
        if rec is None:
            raise CorruptCheckpointError(f"{path}: not listed in the manifest")
        try:
            algorithm, expected = checksum.record_digests(rec)
        except ValueError as e:
            raise CorruptCheckpointError(f"{path}: manifest record: {e}") from None
        try:
            if os.stat(path).st_size != rec["bytes"]:
                raise CorruptCheckpointError(f"{path}: size {os.stat(path).st_size} bytes, manifest says "
                                             f"{rec['bytes']} (truncated or appended)")
            block = rec["block"]
            got = blockio.read_file(path, blockio.cover_blocks(segs, rec["bytes"], block), threads=self.threads,
                                    verify=True, size=rec["bytes"], block=block, algorithm=algorithm)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: missing") from None
        except EOFError as e:
            raise CorruptCheckpointError(str(e)) from None
        bad = checksum.mismatched_blocks(expected, got)
        if bad:
            start, end = bad[0] * block, min(rec["bytes"], (bad[-1] + 1) * block)
            names = [i.fqn for i, info in self.storage_data.items() if info.relative_path == name
                     and info.offset < end and info.offset + info.length > start]
            raise CorruptCheckpointError(damage_message(path, start, end, names, algorithm))
