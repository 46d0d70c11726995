"""Pre-flight cost of the held-out/training document overlap check (data/overlap.py) on a synthetic corpus.

Writes two indexed datasets the way ``dist-train data prepare`` lays them out (uint16 ``.bin``, megatron-core
``.idx``, a sidecar with the token digest, ``PREFIX.doc_hashes``): ``--train-docs`` random documents of uniform
length in [2, 2·mean) ending in an EOD, and ``--valid-docs`` of which ``--overlap`` are copies of random training
documents. Then, ``--repeats`` times in turn: the dataset checks the pre-flight already runs on both
(``check_indexed_dataset``: the baseline), the overlap check reading the ``.doc_hashes`` files, and the overlap check
of the same datasets without them (every document hashed from the ``.bin``); then, as for datasets built elsewhere
(no sidecar, no ``.doc_hashes``: each ``.bin`` scanned for its token ids and hashed), the pre-flight's dataset checks
and overlap check together as they run now (one read of each ``.bin``: ``overlap.checked_dataset``) and as they ran
before (the token-id scan, then the hashing: two reads). Reports medians, their ratio to the baseline, and checks
that the count found is the number of copies planted of at least the minimum length. The files are read from the
page cache (just written): a cold read adds the disk's time for 8 B per document, or for the whole ``.bin`` without
the files (for each of the two reads, when the ``.bin`` is larger than the page cache).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import xxhash

from ..config import DataConfig
from ..data.document_hashes import compute_document_hashes, document_hashes_path, write_document_hashes
from ..data.integrity import INDEX_MAGIC, check_indexed_dataset
from ..data.overlap import Checked, Overlap, checked_dataset, valid_path_overlap
from ..data.sidecar import DIGEST_ALGORITHM, SUFFIX, write_sidecar

VOCAB, EOD = 50257, 50256
_UINT16_CODE = 8  # megatron-core's DType code of uint16
#: documents generated per step: bounds the generator's memory
_CHUNK_DOCS = 1 << 18


def _write_dataset(prefix: Path, lengths: np.ndarray, fill: Callable[[int, int], np.ndarray]) -> None:
    """PREFIX.bin/.idx/.meta.json/.doc_hashes of documents ``lengths`` [D] (tokens each, EOD included) whose tokens
    ``fill(lo, hi)`` gives for documents [lo, hi) (uint16, concatenated)."""
    digest = xxhash.xxh3_64()
    with open(f"{prefix}.bin", "wb") as f:
        for lo in range(0, len(lengths), _CHUNK_DOCS):
            tokens = fill(lo, min(len(lengths), lo + _CHUNK_DOCS))
            digest.update(tokens.tobytes())
            f.write(tokens.tobytes())
    n = len(lengths)
    pointers = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * 2
    with open(f"{prefix}.idx", "wb") as f:
        f.write(struct.pack("<9sQBQQ", INDEX_MAGIC, 1, _UINT16_CODE, n, n + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.astype(np.int64).tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
    identity = f"{DIGEST_ALGORITHM}:{digest.hexdigest()}"
    write_sidecar(prefix, {"tokenizer": "synthetic", "vocab_size": VOCAB, "eod_id": EOD, "max_token_id": EOD,
                           "documents": n, "tokens": int(lengths.sum()), "digest": identity})
    result = check_indexed_dataset(prefix, VOCAB, 16)
    write_document_hashes(prefix, compute_document_hashes(prefix, result["index"]), identity)


def _random_documents(rng: np.random.Generator, lengths: np.ndarray) -> Callable[[int, int], np.ndarray]:
    def fill(lo: int, hi: int) -> np.ndarray:
        part = lengths[lo:hi]
        tokens = rng.integers(0, EOD, int(part.sum()), dtype=np.uint16)
        tokens[np.cumsum(part) - 1] = EOD
        return tokens
    return fill


def _build(args: argparse.Namespace, work: Path) -> tuple[Path, Path, int]:
    """The two datasets; returns their prefixes and the number of planted copies of at least the minimum length."""
    rng = np.random.default_rng(0)
    train, valid = work / "train", work / "valid"
    train_lengths = rng.integers(2, 2 * args.mean_tokens, args.train_docs)
    _write_dataset(train, train_lengths, _random_documents(rng, train_lengths))
    copies = rng.choice(args.train_docs, size=int(round(args.overlap * args.valid_docs)), replace=False)
    fresh = rng.integers(2, 2 * args.mean_tokens, args.valid_docs - len(copies))
    starts = np.concatenate(([0], np.cumsum(train_lengths)))
    tokens = np.memmap(f"{train}.bin", dtype=np.uint16, mode="r")
    docs = [tokens[starts[i]:starts[i + 1]] for i in copies]
    docs += np.split(_random_documents(rng, fresh)(0, len(fresh)), np.cumsum(fresh)[:-1]) if len(fresh) else []
    order = rng.permutation(len(docs))
    valid_lengths = np.array([len(docs[i]) for i in order], dtype=np.int64)
    stream = np.concatenate([docs[i] for i in order]).astype(np.uint16)
    bounds = np.concatenate(([0], np.cumsum(valid_lengths)))
    _write_dataset(valid, valid_lengths, lambda lo, hi: stream[bounds[lo]:bounds[hi]])
    planted = int((train_lengths[copies] >= DataConfig.valid_overlap_min_tokens).sum())
    return train, valid, planted


#: the pre-flight's data checks and overlap check of two datasets built elsewhere, as it runs them (one read of each
#: .bin: overlap.checked_dataset) and as it ran them before (the token-id scan, then the hashing: two reads)
ELSEWHERE_ONE_READ = "no sidecar/file: checks + overlap, 1 read"
ELSEWHERE_TWO_READS = "no sidecar/file: checks + overlap, 2 reads (before)"


def _elsewhere_one_read(train: Path, valid: Path, min_tokens: int) -> Overlap:
    sets = [checked_dataset(str(p), VOCAB, 16, key, True)
            for p, key in ((train, "data.path"), (valid, "data.valid_path"))]
    return valid_path_overlap(sets[0], sets[1], min_tokens, 16, None)


def _elsewhere_two_reads(train: Path, valid: Path, min_tokens: int) -> Overlap:
    sets = [Checked(str(p), check_indexed_dataset(p, VOCAB, 16, key)["index"], None, key)
            for p, key in ((train, "data.path"), (valid, "data.valid_path"))]
    return valid_path_overlap(sets[0], sets[1], min_tokens, 16, None)


@contextmanager
def _moved_aside(paths: list[Path]) -> Iterator[None]:
    """``paths`` renamed to ``PATH.off`` for the block, and back after it."""
    for path in paths:
        path.rename(f"{path}.off")
    try:
        yield
    finally:
        for path in paths:
            Path(f"{path}.off").rename(path)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace, checked: int) -> int:
    """``checked``: the bytes dist_train.bench.cli.overlap.check found room for."""
    min_tokens = DataConfig.valid_overlap_min_tokens
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dt_bench_overlap_", dir=args.dir) as tmp:
        build_s, (train, valid, planted) = _timed(lambda: _build(args, Path(tmp)))
        hash_s, _ = _timed(lambda: compute_document_hashes(train, check_indexed_dataset(train, VOCAB, 16)["index"]))
        times: dict[str, list[float]] = {"dataset checks (baseline)": [], "overlap, .doc_hashes": [],
                                         "overlap, hashed from .bin": [], ELSEWHERE_ONE_READ: [],
                                         ELSEWHERE_TWO_READS: []}
        found: dict[str, int] = {}
        for repeat in range(args.repeats):
            base_s, results = _timed(lambda: [check_indexed_dataset(p, VOCAB, 16) for p in (train, valid)])
            times["dataset checks (baseline)"].append(base_s)
            sets = [Checked(str(p), r["index"], r["sidecar"]) for p, r in zip((train, valid), results)]
            for name, hidden in (("overlap, .doc_hashes", False), ("overlap, hashed from .bin", True)):
                with _moved_aside([document_hashes_path(p) for p in (train, valid)] if hidden else []):
                    seconds, overlap = _timed(lambda: valid_path_overlap(sets[0], sets[1], min_tokens, 16, None))
                times[name].append(seconds)
                found[name] = overlap.shared
            # built elsewhere (no sidecar, no .doc_hashes): the dataset checks scan each .bin for its token ids, and
            # the overlap check hashes its documents; the two flows alternate which goes first
            flows = [(ELSEWHERE_ONE_READ, _elsewhere_one_read), (ELSEWHERE_TWO_READS, _elsewhere_two_reads)]
            with _moved_aside([Path(f"{p}{suffix}") for p in (train, valid) for suffix in (SUFFIX, ".doc_hashes")]):
                for name, flow in flows[::-1] if repeat % 2 else flows:
                    seconds, overlap = _timed(lambda: flow(train, valid, min_tokens))
                    times[name].append(seconds)
                    found[name] = overlap.shared
    load_after = os.getloadavg()
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["dataset checks (baseline)"]
    rows = [{"measurement": k, "median_s": medians[k], "vs_baseline": medians[k] / base, "runs_s": v}
            for k, v in times.items()]
    ok = all(n == planted for n in found.values())
    print(f"overlap check, {args.train_docs:,} training and {args.valid_docs:,} held-out documents of mean "
          f"{args.mean_tokens} tokens, {planted:,} copies planted (>= {min_tokens} tokens), median of {args.repeats}; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'measurement':50} {'median s':>9} {'vs baseline':>12}")
    for r in rows:
        print(f"{r['measurement']:50} {r['median_s']:9.3f} {r['vs_baseline']:11.2f}x")
    print(f"setup: datasets written in {build_s:.1f} s; hashing the training .bin (what `dist-train data hash` does) {hash_s:.2f} s; "
          f"found {found} of {planted} planted: {'ok' if ok else 'WRONG'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join(sys.argv), "train_docs": args.train_docs, "valid_docs": args.valid_docs,
            "mean_tokens": args.mean_tokens, "overlap": args.overlap, "planted": planted, "found": found,
            "data_hash_train_s": hash_s, "load_average_before": load_before, "load_average_after": load_after,
            "results": rows}, indent=2))
    return 0 if ok else 1
