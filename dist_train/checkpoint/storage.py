"""File-level plumbing under ``torch.distributed.checkpoint`` (DCP): checksummed writes, a reader that
never unpickles arbitrary objects, and small durable files.

* ``ChecksumWriter`` is DCP's ``FileSystemWriter`` whose streams compute CRC-32s (one per 4 MiB block)
  and a byte count *while* DCP writes (no second pass over the data). ``writer.records`` maps each file
  name written by this rank to ``{"bytes": int, "block": int, "crc32": ["8 hex digits", ...]}``.
* ``SafeReader`` is DCP's ``FileSystemReader`` whose ``.metadata`` (a pickle written by DCP) is read with
  an allow-list unpickler: only DCP's metadata dataclasses, ``torch.Size``, dtypes and layouts can be
  constructed. Entries that DCP stores as pickled bytes (``BytesStorageMetadata``, which DCP's planner loads
  with ``torch.load(weights_only=False)``) are refused: we only ever save tensors through DCP. Tensor data
  itself is read by DCP with ``torch.load(weights_only=True)``.
* ``write_file_durable`` / ``fsync_dir`` / ``file_block_crcs``: temp-file + fsync + rename, checksums.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
import zlib
from pathlib import Path
from typing import Any, Generator, Union

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystem

PathLike = Union[str, os.PathLike]
BLOCK = 4 << 20  # checksum granularity: one CRC-32 per 4 MiB of every file


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or unsafe to load, or a save failed; the message names the file."""


def _hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


def file_block_crcs(path: PathLike, block: int = BLOCK) -> dict:
    """``{"bytes": size, "block": block, "crc32": [CRC-32 of each block, 8 hex digits]}`` of a file.

    Per-block checksums (not one per file) let ``verify`` say *which bytes* are damaged and so name the
    tensor stored there; the cost is the same single pass over the data."""
    crcs, size = [], 0
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
            crcs.append(_hex(zlib.crc32(view[:n])))
            size += n
    return {"bytes": size, "block": block, "crc32": crcs}


def bytes_block_crcs(data: bytes, block: int = BLOCK) -> dict:
    view = memoryview(data)
    return {"bytes": len(data), "block": block,
            "crc32": [_hex(zlib.crc32(view[i:i + block])) for i in range(0, len(data), block)]}


def fsync_dir(path: PathLike) -> None:
    """Make a rename/creation inside ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durable(path: PathLike, data: bytes) -> dict:
    """Write ``data`` to ``path`` atomically (temp + fsync + rename + dir fsync); return its checksum record."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return bytes_block_crcs(data)


class _ChecksumStream(io.RawIOBase):
    """Write-only stream wrapper: forwards to ``raw`` and folds the written bytes into per-block CRC-32s.

    DCP only appends (``write`` + ``tell``); a ``seek`` that is not a no-op marks the running checksums
    invalid and the file is re-read once at close instead, so the record is always right."""

    def __init__(self, raw: io.BufferedWriter, block: int = BLOCK) -> None:
        super().__init__()
        self._raw = raw
        self.block = block
        self.crcs: list[str] = []
        self._crc = 0
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
            self._crc = zlib.crc32(mv[pos:pos + take], self._crc)
            self._fill += take
            pos += take
            if self._fill == self.block:
                self.crcs.append(_hex(self._crc))
                self._crc, self._fill = 0, 0
        self.size += len(mv)
        return n

    def record(self) -> dict:
        tail = [_hex(self._crc)] if self._fill else []
        return {"bytes": self.size, "block": self.block, "crc32": self.crcs + tail}

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
        rec = stream.record() if stream.valid else file_block_crcs(path)
        with self._lock:
            self.records[path.name] = rec

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:  # DCP writes ".metadata.tmp" then renames it: move the record with it
            rec = self.records.pop(Path(path).name, None)
            if rec is not None:
                self.records[Path(new_path).name] = rec


class ChecksumWriter(FileSystemWriter):
    """DCP ``FileSystemWriter`` (fsync on, ``thread_count`` writer threads) that checksums while writing."""

    def __init__(self, path: PathLike, thread_count: int = 1) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count,
                         overwrite=True)
        self.fs = _ChecksumFileSystem()

    @property
    def records(self) -> dict[str, dict]:
        return dict(self.fs.records)


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
        if not rel or "/" in rel or "\\" in rel or rel.startswith(".."):
            raise CheckpointError(f"{path}: storage file name {rel!r} is not a plain file name")
    return md


class SafeReader(FileSystemReader):
    """DCP ``FileSystemReader`` whose metadata goes through ``load_dcp_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        md = load_dcp_metadata(self._get_metadata_path(rank))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
