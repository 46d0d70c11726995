"""Start-up checks of a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``), before any rank starts.

    info = read_index("data/pystd")          # the .idx header and tables, or ValueError (one line)
    check_bin_size("data/pystd", info)        # the .bin holds exactly the tokens the .idx describes
    check_indexed_dataset("data/pystd", vocab_size=257, seq_len=256)   # all of it + the token id range

``.idx`` layout (megatron-core ``IndexedDatasetBuilder``, little-endian): magic ``MMIDIDX\\0\\0`` (9 bytes),
version u64 (= 1), token dtype code u8, sequence count S u64, document count D u64 — 34 bytes — then
int32 lengths [S], int64 byte pointers [S], int64 document indices [D] (and int8 modes [S] when
multimodal). The ``.bin`` is every sequence's tokens concatenated, so its size is sum(lengths) × itemsize.

Token ids must be ``< model.vocab_size`` (an id beyond the embedding table is an IndexError inside the
model): the largest id comes from the dataset's sidecar (``PREFIX.meta.json``, written by ``dist-train
data prepare``) when there is one, else from a scan of the memory-mapped ``.bin`` (numpy min and max of each
SCAN_TOKENS-token chunk, one read of the file: 512 MiB of uint16 from the page cache took 0.065 s, median of 5, the
whole-map min then max 0.069 s, on this 2-core machine at load average 11; earlier 0.17-0.21 s at load 18). The
pre-flight hashes the documents for the overlap check in that same read (data/overlap.py ``checked_dataset``).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .sidecar import read_sidecar, sidecar_path

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
#: megatron-core's DType codes; the floating-point ones cannot hold token ids
_TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}

Prefix = Union[str, Path]
_CHUNK = 1 << 20  # sequences per step of the pointer check
#: tokens per step of a scan of the .bin (64 MiB of them as uint32)
SCAN_TOKENS = 1 << 24


@dataclass(frozen=True)
class IndexInfo:
    """What a ``.idx`` says: token dtype, per-sequence lengths (tokens) and byte pointers into the ``.bin``."""

    dtype: np.dtype
    lengths: np.ndarray  # int32 [S]
    pointers: np.ndarray  # int64 [S]
    documents: int  # entries of the document table: the document count + 1
    document_indices: np.ndarray  # int64 [documents]: document d is sequences [document_indices[d], [d + 1])

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def read_index(prefix: Prefix, key: str = "data.path") -> IndexInfo:
    """Parse ``PREFIX.idx``; a missing, truncated or foreign file is a ValueError naming it (one line) and the config
    key that names the dataset (``key``: data.path or data.valid_path)."""
    path = Path(f"{prefix}.idx")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise ValueError(f"{key} = {prefix}: cannot read {path} ({e.strerror or e})") from None
    if len(head) < _HEADER.size:
        raise ValueError(f"{key} = {prefix}: {path} is {size} bytes, shorter than the {_HEADER.size}-byte "
                         "header of a Megatron index: truncated; rebuild it with dist-train data prepare")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if magic != INDEX_MAGIC:
        raise ValueError(f"{key} = {prefix}: {path} does not start with the Megatron index magic "
                         f"{INDEX_MAGIC!r} (found {magic!r}): not an indexed-dataset .idx")
    if version != 1:
        raise ValueError(f"{key} = {prefix}: {path} has index version {version}; only version 1 is supported")
    if code not in _TOKEN_DTYPES:
        raise ValueError(f"{key} = {prefix}: {path} declares token dtype code {code}; token ids need an "
                         f"integer code ({', '.join(map(str, sorted(_TOKEN_DTYPES)))})")
    expected = _HEADER.size + 12 * n_seq + 8 * n_doc
    if size not in (expected, expected + n_seq):  # + int8 modes when multimodal
        raise ValueError(f"{key} = {prefix}: {path} is {size:,} bytes but its header promises {n_seq:,} "
                         f"sequences and {n_doc:,} documents ({expected:,} bytes): truncated or damaged")
    table = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(table, dtype=np.int32, count=n_seq, offset=_HEADER.size)
    pointers = np.frombuffer(table, dtype=np.int64, count=n_seq, offset=_HEADER.size + 4 * n_seq)
    document_indices = np.frombuffer(table, dtype=np.int64, count=n_doc, offset=_HEADER.size + 12 * n_seq)
    if n_seq and int(lengths.min()) < 0:
        raise ValueError(f"{key} = {prefix}: {path} lists a negative sequence length: damaged")
    return IndexInfo(np.dtype(_TOKEN_DTYPES[code]), lengths, pointers, int(n_doc), document_indices)


def check_bin_size(prefix: Prefix, info: IndexInfo, key: str = "data.path") -> None:
    """The ``.bin`` must be exactly the bytes the ``.idx`` describes (a truncated .bin would otherwise train
    on whatever is left, silently). ``key``: the config key its messages name (:func:`read_index`)."""
    path = Path(f"{prefix}.bin")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ValueError(f"{key} = {prefix}: cannot read {path} ({e.strerror or e})") from None
    itemsize = info.dtype.itemsize
    expected = info.tokens * itemsize
    if size != expected:
        what = "truncated" if size < expected else f"{size - expected:,} bytes longer"
        raise ValueError(f"{key} = {prefix}: {path} is {size:,} bytes but {prefix}.idx describes {info.tokens:,} "
                         f"tokens of {itemsize} bytes ({expected:,} bytes): the .bin is {what} or the two files "
                         "come from different builds; rebuild with dist-train data prepare")
    offset = 0  # in chunks: an index of 10^8 sequences must not need GBs of temporaries here
    for lo in range(0, len(info.lengths), _CHUNK):
        lengths = info.lengths[lo:lo + _CHUNK].astype(np.int64)
        starts = offset + np.concatenate(([0], np.cumsum(lengths[:-1])))
        if not np.array_equal(starts * itemsize, info.pointers[lo:lo + _CHUNK]):
            raise ValueError(f"{key} = {prefix}: {prefix}.idx sequence pointers do not match its lengths: "
                             "damaged index; rebuild with dist-train data prepare")
        offset += int(lengths.sum())


def document_bounds(prefix: Prefix, info: IndexInfo, key: str = "data.path") -> np.ndarray:
    """int64 [D + 1]: document d is tokens [bounds[d], bounds[d + 1]) of the ``.bin`` (its sequences are contiguous:
    :func:`check_bin_size` checked the pointers). ValueError (one line) when the document table is not the sequence
    indices 0 .. S in order, as megatron-core writes it; it names ``key`` (:func:`read_index`)."""
    docs, n_seq = info.document_indices, len(info.lengths)
    if (len(docs) == 0 or int(docs[0]) != 0 or int(docs[-1]) != n_seq
            or (len(docs) > 1 and bool((np.diff(docs) < 0).any()))):
        raise ValueError(f"{key} = {prefix}: {prefix}.idx document table does not run from sequence 0 to "
                         f"{n_seq:,} in order: damaged index; rebuild with dist-train data prepare")
    seq_starts = np.empty(n_seq + 1, dtype=np.int64)
    seq_starts[:n_seq] = info.pointers // info.dtype.itemsize
    seq_starts[n_seq] = info.tokens
    return seq_starts[docs]


def widen_id_range(seen: Optional[tuple[int, int]], chunk: np.ndarray) -> Optional[tuple[int, int]]:
    """``seen`` (the (min, max) token id of the chunks before; None: none yet) widened by ``chunk``'s ids. A scan of
    the ``.bin`` calls it chunk by chunk, so the max reads the pages the min just brought into the page cache: over
    the whole memory map at once, a ``.bin`` larger than the page cache would be read from the disk twice."""
    if not len(chunk):
        return seen
    lo, hi = int(chunk.min()), int(chunk.max())
    return (lo, hi) if seen is None else (min(lo, seen[0]), max(hi, seen[1]))


def token_id_range(prefix: Prefix, info: IndexInfo) -> tuple[int, int]:
    """(min, max) token id of the ``.bin`` ((0, -1) when empty), scanned through a memory map (no copy of the file)
    in one read, SCAN_TOKENS at a time (:func:`widen_id_range`)."""
    seen = None
    if info.tokens:
        tokens = np.memmap(f"{prefix}.bin", dtype=info.dtype, mode="r")
        for lo in range(0, len(tokens), SCAN_TOKENS):
            seen = widen_id_range(seen, tokens[lo:lo + SCAN_TOKENS])
    return seen or (0, -1)


#: what a path that names one of a dataset's files, not its prefix, ends with
DATASET_SUFFIXES = (".bin", ".idx", ".meta.json", ".doc_hashes")


def prefix_hint(path: Prefix) -> str:
    """For a dataset path that is not a prefix, `` (did you mean PREFIX? ...)``: a path naming one of its files
    (``data/train.bin``) or a directory holding datasets; else nothing."""
    text = str(path)
    for suffix in DATASET_SUFFIXES:
        stem = text[:-len(suffix)]
        if text.endswith(suffix) and Path(f"{stem}.bin").is_file() and Path(f"{stem}.idx").is_file():
            return f" (a dataset path is the prefix of its files: did you mean {stem}?)"
    if Path(text).is_dir():
        found = sorted(str(idx.with_suffix("")) for idx in Path(text).glob("*.idx") if idx.with_suffix(".bin").is_file())
        return (f" ({text} is a directory; a dataset path is the prefix of its .bin/.idx"
                + (f", e.g. {', '.join(found[:3])})" if found else ")"))
    return ""


def check_indexed_dataset(prefix: Prefix, vocab_size: int, seq_len: int, key: str = "data.path",
                          scan: Callable[[Prefix, IndexInfo], tuple[int, int]] = token_id_range) -> dict:
    """Every start-up check of one dataset; returns ``{"tokens", "max_token_id", "source", "index", "sidecar"}``
    (source: "sidecar" or "scan"; index: the :class:`IndexInfo` read; sidecar: the sidecar read, None when there is
    none), so later checks need not read the files again. Raises ValueError with one line naming the config key that
    names the dataset (``key``: data.path or data.valid_path), the file and what would be valid. ``scan``: how the
    (min, max) token id is read from the ``.bin`` of a dataset without a sidecar, :func:`token_id_range`'s contract
    (the pre-flight's also hashes the documents in that read: data/overlap.py ``checked_dataset``)."""
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise ValueError(f"{key} = {prefix}: {prefix}{suffix} not found"
                             + (prefix_hint(prefix) or f" (build the dataset with dist-train data prepare --output "
                                                       f"{prefix})"))
    info = read_index(prefix, key)
    check_bin_size(prefix, info, key)
    meta = read_sidecar(prefix)
    if meta is not None and int(meta.get("tokens", info.tokens)) != info.tokens:
        raise ValueError(f"{key} = {prefix}: {sidecar_path(prefix)} records {int(meta['tokens']):,} tokens but "
                         f"{prefix}.idx describes {info.tokens:,}: the sidecar belongs to another build")
    if meta is not None:
        lo, hi, source = 0, int(meta["max_token_id"]), f"its sidecar {sidecar_path(prefix).name}"
    else:
        lo, hi = scan(prefix, info)
        source = f"a scan of {Path(f'{prefix}.bin').name}"
    if lo < 0:
        raise ValueError(f"{key} = {prefix}: token id {lo} (from {source}) is negative: damaged .bin")
    if hi >= vocab_size:
        raise ValueError(f"{key} = {prefix}: token id {hi} (from {source}) is outside model.vocab_size = "
                         f"{vocab_size} (valid ids 0..{vocab_size - 1}); set model.vocab_size >= {hi + 1} or "
                         "prepare the data with the model's tokenizer")
    if info.tokens < seq_len + 1:
        raise ValueError(f"{key} = {prefix}: {info.tokens:,} tokens is fewer than data.seq_len + 1 = "
                         f"{seq_len + 1}")
    return {"tokens": info.tokens, "max_token_id": hi, "source": "sidecar" if meta is not None else "scan",
            "index": info, "sidecar": meta}
