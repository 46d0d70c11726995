"""Per-document content hashes of an indexed dataset, ``PREFIX.doc_hashes``: what tells which validation documents
the training data holds too (:mod:`.overlap`).

    write_document_hashes("data/c", hashes, identity)     # dist-train data prepare does, beside .bin/.idx
    hashes, source = dataset_document_hashes("data/c", read_index("data/c"), identity)   # uint64 [D]

A document's hash is the XXH3-64 of its token ids (its EOD included) as little-endian uint32, so it does not depend
on the ``.bin``'s token dtype (uint16 or int32). File layout, little-endian: magic ``DTDOCHSH`` (8 bytes), version
u32 (= 1), u32 0, document count u64, the dataset's identity u64 (the XXH3-64 of
:func:`~.datasets.dataset_identity`'s string: the sidecar's token digest, else the sampled fingerprint), then uint64 [D] — 32 + 8 B per document.
The identity binds the file to the build of ``PREFIX.bin`` it was hashed from: a file left beside another build of
the same prefix (or of a count that differs from the ``.idx``'s) is not used.

A dataset without a usable file (prepared before this file existed, or built by Megatron-LM's tools) has its hashes
computed from the ``.bin``, in chunks of CHUNK_TOKENS tokens (one XXH3 call per document: 0.6-0.7 µs each on the
project's 2-core machine, 1.4 s for 2 million documents; docs/benchmarks/overlap.md); ``dist-train data hash PREFIX``
writes the file once instead.
"""
from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import xxhash

from ..atomic_write import atomic_path
from .datasets import dataset_identity
from .integrity import IndexInfo, check_bin_size, document_bounds, read_index, token_id_range, widen_id_range
from .sidecar import read_sidecar

SUFFIX = ".doc_hashes"
MAGIC = b"DTDOCHSH"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, 0, document count, identity
#: tokens per step of the computation from the .bin: 64 MiB of uint32 ids at a time
CHUNK_TOKENS = 1 << 24
#: a dataset of this many documents hashed from its .bin gets a note on stderr (one line): seconds at every start
NOTE_DOCUMENTS = 1_000_000
#: hashing from the .bin, per document, on the project's 2-core machine (docs/benchmarks/overlap.md: 0.6-0.7 µs)
SECONDS_PER_DOCUMENT = 0.7e-6

Prefix = Union[str, Path]


def document_hashes_path(prefix: Prefix) -> Path:
    return Path(f"{prefix}{SUFFIX}")


def document_hash(ids: Union[Sequence[int], np.ndarray]) -> int:
    """The hash of one document of token ``ids`` (a list, or an integer array of any dtype; see the module
    docstring)."""
    return xxhash.xxh3_64_intdigest(np.asarray(ids, dtype="<u4").tobytes())


def identity_hash(identity: str) -> int:
    """The u64 a file records of the dataset identity string (``"xxh3_64:<hex>"``, or a sampled fingerprint)."""
    return xxhash.xxh3_64_intdigest(identity.encode())


def write_document_hashes(prefix: Prefix, hashes: np.ndarray, identity: str) -> Path:
    """Write ``hashes`` (uint64 [D], document order) as PREFIX.doc_hashes for the dataset of ``identity``,
    atomically (temporary file + rename)."""
    path = document_hashes_path(prefix)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, 0, len(hashes), identity_hash(identity)))
        f.write(np.ascontiguousarray(hashes, dtype="<u8").tobytes())
    return path


def read_document_hashes(prefix: Prefix, documents: int, identity: Optional[str]) -> Union[np.ndarray, str]:
    """The hashes of PREFIX.doc_hashes (uint64 [documents], memory-mapped) when the file belongs to this build of
    the dataset (``documents``: the ``.idx``'s count; ``identity``: :func:`~.datasets.dataset_identity`'s); else why
    it is not used (one phrase)."""
    path = document_hashes_path(prefix)
    if not path.is_file():
        return f"no {path.name}"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:  # e.g. another user's file, written under umask 077: the .bin can still be hashed
        return f"{path.name} cannot be read ({e.strerror or e})"
    if len(head) < _HEADER.size:
        return f"{path.name} is truncated"
    magic, version, _, count, recorded = _HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        return f"{path.name} is not a version-{VERSION} document hash file"
    if count != documents or size != _HEADER.size + 8 * count:
        return f"{path.name} holds {count:,} documents in {size:,} bytes, the .idx {documents:,}: another build"
    if identity is None or recorded != identity_hash(identity):
        return f"{path.name} was hashed from another build of {Path(str(prefix)).name}.bin"
    if count == 0:
        return np.empty(0, dtype=np.uint64)
    return np.memmap(path, dtype="<u8", mode="r", offset=_HEADER.size, shape=(count,))


def compute_document_hashes(prefix: Prefix, info: IndexInfo, key: str = "data.path") -> np.ndarray:
    """uint64 [D]: every document's hash, computed from ``PREFIX.bin`` (memory-mapped, CHUNK_TOKENS at a time).
    ValueError (one line, naming ``key``: :func:`~.integrity.read_index`) when the document table is damaged."""
    return scan_document_hashes(prefix, info, document_bounds(prefix, info, key), token_range=False)[0]


def scan_document_hashes(prefix: Prefix, info: IndexInfo, bounds: np.ndarray,
                         token_range: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint64 [D] every document's hash, the (min, max) token id ((0, -1) when empty)) in one read of ``PREFIX.bin``
    (``bounds``: its :func:`~.integrity.document_bounds`): the pre-flight needs both of a dataset without a sidecar
    and a ``.doc_hashes`` file, and a second read of a 100 GB ``.bin`` would double a long wait. The documents
    cover the whole ``.bin``, so the range is :func:`~.integrity.token_id_range`'s. ``token_range`` False: a caller
    that has the range already (a sidecar records it) skips the min/max of every chunk, and gets (0, -1)."""
    n_docs = len(bounds) - 1
    out = np.empty(n_docs, dtype=np.uint64)
    seen = None
    empty = not (n_docs and info.tokens)
    tokens = np.empty(0, info.dtype) if empty else np.memmap(f"{prefix}.bin", dtype=info.dtype, mode="r")
    digest = xxhash.xxh3_64_intdigest
    lo = 0
    while lo < n_docs:
        # whole documents up to CHUNK_TOKENS tokens, at least one (a longer document is its own chunk)
        hi = int(np.searchsorted(bounds, bounds[lo] + CHUNK_TOKENS, side="right")) - 1
        hi = min(n_docs, max(hi, lo + 1))
        first = int(bounds[lo])
        chunk = tokens[first:int(bounds[hi])]
        if token_range:
            seen = widen_id_range(seen, chunk)  # the dtype's own ids: "<u4" would wrap a negative one
        ids = memoryview(np.ascontiguousarray(chunk, dtype="<u4")).cast("B")
        offsets = ((bounds[lo:hi + 1] - first) * 4).tolist()
        out[lo:hi] = [digest(ids[a:b]) for a, b in zip(offsets, offsets[1:])]
        lo = hi
    return out, seen or (0, -1)


def _note_hashing(prefix: Prefix, documents: int, why: str) -> None:
    """A dataset of NOTE_DOCUMENTS documents or more hashed from its .bin: seconds at every start; say why (``why``:
    :func:`read_document_hashes`'s phrase), and how to spend them once (one line on stderr)."""
    if documents >= NOTE_DOCUMENTS:
        print(f"dist-train: {prefix}: {why}; hashing its {documents:,} documents from {Path(str(prefix)).name}.bin "
              f"for the held-out overlap check (about {documents * SECONDS_PER_DOCUMENT:.0f} s, at every start); "
              f"'dist-train data hash {prefix}' writes the file once", file=sys.stderr, flush=True)


def dataset_document_hashes(prefix: Prefix, info: IndexInfo, identity: Optional[str],
                            key: str = "data.path") -> tuple[np.ndarray, str]:
    """``(hashes uint64 [D], source)`` of the dataset at ``prefix`` whose index was read as ``info`` and whose identity
    is ``identity`` (:func:`~.datasets.dataset_identity`, computed by the caller, which needs it elsewhere too):
    PREFIX.doc_hashes's when it belongs to this build (source ``"file"``), else computed from the ``.bin`` (source
    ``"computed: <why the file was not used>"``). ``key``: as :func:`compute_document_hashes`'s."""
    documents = max(0, info.documents - 1)
    found = read_document_hashes(prefix, documents, identity)
    if isinstance(found, str):
        _note_hashing(prefix, documents, found)
        return compute_document_hashes(prefix, info, key), f"computed: {found}"
    return found, "file"


def token_range_and_hashes(prefix: Prefix, info: IndexInfo, identity: Optional[str],
                           key: str = "data.path") -> tuple[tuple[int, int], Optional[np.ndarray]]:
    """((min, max) token id of ``PREFIX.bin``, :func:`dataset_document_hashes`'s hashes) with one read of the ``.bin``:
    the ``.doc_hashes`` file's hashes when it belongs to this build (the read is :func:`~.integrity.token_id_range`'s),
    else both from :func:`scan_document_hashes`. The hashes are None when the document table is damaged: the range
    is read alone then, and the overlap check refuses the table in its turn (computing the hashes there raises the
    same line before it reads the ``.bin``)."""
    documents = max(0, info.documents - 1)
    found = read_document_hashes(prefix, documents, identity)
    if not isinstance(found, str):
        return token_id_range(prefix, info), found
    try:
        bounds = document_bounds(prefix, info, key)
    except ValueError:
        return token_id_range(prefix, info), None
    _note_hashing(prefix, documents, found)
    hashes, token_range = scan_document_hashes(prefix, info, bounds)
    return token_range, hashes


def hash_dataset(prefix: Prefix) -> dict:
    """``dist-train data hash PREFIX``: compute every document's hash from the ``.bin`` and write PREFIX.doc_hashes
    (replacing one of another build); ValueError (one line) when the dataset is missing or damaged, or the file
    cannot be written. Returns ``{"path", "documents"}``."""
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise ValueError(f"{prefix}: {prefix}{suffix} not found (give the prefix of a dataset's .bin/.idx)")
    info = read_index(prefix)
    check_bin_size(prefix, info)
    hashes = compute_document_hashes(prefix, info)
    try:
        path = write_document_hashes(prefix, hashes, dataset_identity(str(prefix), read_sidecar(prefix)))
    except OSError as e:  # a shared, read-only dataset directory
        raise ValueError(f"{prefix}: cannot write {document_hashes_path(prefix)} ({e.strerror or e}): the file goes "
                         "beside the dataset's .bin; run data hash where that directory is writable, or check "
                         "without the file (the pre-flight hashes the .bin then)") from None
    return {"path": str(path), "documents": len(hashes)}
