"""Block checksums of checkpoint files: the one place that knows the algorithm.

    h = new_hasher()                     # streaming, one per block: h.update(view); ...; h.hexdigest()
    digest(data)                         # one-shot hex digest of a buffer
    rec = make_record(size, block, [digest, ...])
    # -> {"bytes": size, "block": block, "checksum": "xxh3_64", "digests": ["0123456789abcdef", ...]}
    algorithm, digests = record_digests(rec)   # also reads the older {"bytes", "block", "crc32": [...]}
    bad = mismatched_blocks(digests, {block index: hex digest computed now})

Every file of a checkpoint is checksummed per ``block`` bytes (4 MiB for shards), so a mismatch names the
damaged byte range and hence the tensors stored there. New records use XXH3-64 (python-xxhash): ≈ 7 GiB/s
per core out of cache on this machine against zlib CRC-32's ≈ 2 GiB/s (docs/benchmarks/ckpt.md), and
the hashing sits on the critical path of every save and verified load. Records written before the switch
carry ``"crc32"`` lists and still verify with CRC-32; the algorithm is always taken from the record, never
assumed, and an unknown algorithm or a digest list that does not match the file's block count is an error
(verification never silently passes).

Hex format: the algorithm's canonical big-endian digest, lowercase (xxhash's ``hexdigest()``: 16 digits;
CRC-32: 8 digits, ``f"{crc:08x}"``). Both ``xxhash`` (4.1.0; one-shot and ``update``) and ``zlib.crc32``
release the GIL for large buffers (measured: a Python thread keeps running during a 1 GiB call), so the
I/O threads of ``blockio`` hash in parallel.
"""
from __future__ import annotations

import zlib
from typing import Protocol, Union

import xxhash

ALGORITHM = "xxh3_64"  # what new records are written with
LEGACY_KEY = "crc32"   # records written before "checksum"/"digests" existed: {"crc32": [8 hex digits, ...]}

Buffer = Union[bytes, bytearray, memoryview]


class Hasher(Protocol):
    def update(self, data: Buffer) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32:
    """zlib CRC-32 behind the ``Hasher`` interface (only to verify records written before XXH3-64)."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: Buffer) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def hexdigest(self) -> str:
        return f"{self._crc & 0xFFFFFFFF:08x}"


_HASHERS = {"xxh3_64": xxhash.xxh3_64, "crc32": _Crc32}
SUPPORTED = tuple(sorted(_HASHERS))


def _check_name(algorithm: str) -> None:
    if algorithm not in _HASHERS:
        raise ValueError(f"checksum algorithm {algorithm!r} is not supported (supported: {', '.join(SUPPORTED)})")


def new_hasher(algorithm: str = ALGORITHM) -> Hasher:
    """A fresh streaming hasher: feeding a block in pieces gives the same digest as ``digest`` of the whole."""
    _check_name(algorithm)
    return _HASHERS[algorithm]()


def digest(data: Buffer, algorithm: str = ALGORITHM) -> str:
    """Hex digest of one buffer."""
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def make_record(size: int, block: int, digests: list[str], algorithm: str = ALGORITHM) -> dict:
    """The manifest record of a file of ``size`` bytes: one digest per ``block`` bytes (the last may be short)."""
    _check_name(algorithm)
    return {"bytes": size, "block": block, "checksum": algorithm, "digests": list(digests)}


def record_digests(rec: dict) -> tuple[str, list[str]]:
    """``(algorithm, per-block hex digests)`` of a record, new (``checksum`` + ``digests``) or legacy
    (``crc32``). Raises ``ValueError`` for an unknown algorithm, a record without digests, or a digest count
    that is not ``ceil(bytes / block)``: such a record cannot vouch for the file."""
    if "checksum" in rec:
        algorithm, digests = rec["checksum"], rec.get("digests")
    elif LEGACY_KEY in rec:
        algorithm, digests = "crc32", rec[LEGACY_KEY]
    else:
        raise ValueError(f"checksum record has no digests (keys: {sorted(rec)}; expected 'checksum' + 'digests' "
                         f"or '{LEGACY_KEY}')")
    _check_name(algorithm)
    size, block = rec.get("bytes"), rec.get("block")
    if not isinstance(size, int) or not isinstance(block, int) or size < 0 or block <= 0:
        raise ValueError(f"checksum record has bytes={size!r}, block={block!r}: need an int >= 0 and an int > 0")
    blocks = -(-size // block)
    if not isinstance(digests, list) or len(digests) != blocks:
        count = len(digests) if isinstance(digests, list) else type(digests).__name__
        raise ValueError(f"checksum record lists {count} {algorithm} digests for {size} bytes in blocks of "
                         f"{block} (= {blocks} blocks)")
    return algorithm, digests


def mismatched_blocks(expected: list[str], got: dict[int, str]) -> list[int]:
    """Sorted indices of the blocks in ``got`` whose digest differs from ``expected`` (or that it lacks)."""
    return sorted(b for b, d in got.items() if b >= len(expected) or d != expected[b])
