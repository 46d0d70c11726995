"""A cheap identity for an indexed dataset that has no recorded token digest (built by Megatron-LM's tools).

``dist-train data prepare`` records the XXH3-64 of the whole token stream in the dataset's sidecar, and a
checkpoint keeps it (``train_digest``), so a resume notices a dataset replaced at the same ``data.path``.
A dataset built elsewhere has no such digest, and hashing terabytes at every start is not an option. Its
fingerprint instead hashes, for ``PREFIX.bin`` and ``PREFIX.idx`` each, the file size and SAMPLES blocks of
BLOCK bytes spread evenly over the file (the first and the last included): 2 × 64 × 16 KiB = 2 MiB read per
start, whatever the dataset's size.

It tells apart what a replaced dataset really is — another corpus, the same corpus re-shuffled or
re-tokenized, another ``.idx`` (document boundaries) — because such files differ almost everywhere; it
does not see an edit of a few bytes between two sampled blocks. The two kinds are never compared with
each other (``digest_kind``): a checkpoint that recorded a full digest is not refused because the sidecar
is gone now.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import xxhash

#: the fingerprint's algorithm, as the prefix of the value a checkpoint records (``"<kind>:<hex>"``)
KIND = "xxh3_64-sampled"
SAMPLES = 64
BLOCK = 16 * 1024


def digest_kind(digest: Optional[str]) -> Optional[str]:
    """``"xxh3_64"`` (a sidecar's whole-stream digest) or ``KIND`` of a recorded value; None for None."""
    return digest.split(":", 1)[0] if digest else None


def comparable_digest(saved: Optional[str], current: Optional[str], prefix: Optional[str]) -> Optional[str]:
    """The identity of the dataset at ``prefix`` to compare with a checkpoint's ``saved`` one: ``current`` (its
    sidecar's digest, else its sampled fingerprint), except when the checkpoint recorded a sampled fingerprint (its
    dataset had no sidecar digest) and this one has a sidecar digest: then this dataset's sampled fingerprint, so
    the same files prepared again with a newer version (a sidecar digest now) are still known to be the same."""
    if saved and current and prefix and digest_kind(saved) == KIND != digest_kind(current):
        return dataset_fingerprint(prefix)
    return current


def _hash_file(h: "xxhash.xxh3_64", path: Path) -> None:
    """Feed ``h`` the file's kind (extension) and size, then SAMPLES blocks of BLOCK bytes at evenly spaced offsets
    from 0 to size - BLOCK (a file shorter than a block is read whole each time: still deterministic)."""
    size = path.stat().st_size
    h.update(path.name.rsplit(".", 1)[-1].encode() + size.to_bytes(8, "little"))
    last = max(0, size - BLOCK)
    with path.open("rb") as f:
        for i in range(SAMPLES):
            f.seek(last * i // (SAMPLES - 1))
            h.update(f.read(BLOCK))


def dataset_fingerprint(prefix: Union[str, Path]) -> Optional[str]:
    """``"xxh3_64-sampled:<hex>"`` of ``PREFIX.bin`` and ``PREFIX.idx`` (see the module docstring); None when
    either file is missing (the dataset checks refuse that themselves)."""
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    if not all(p.is_file() for p in files):
        return None
    h = xxhash.xxh3_64()
    for path in files:
        _hash_file(h, path)
    return f"{KIND}:{h.hexdigest()}"
