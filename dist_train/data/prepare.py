"""Build a Megatron indexed dataset (PREFIX.bin / PREFIX.idx) from text or JSONL files.

    dist-train data prepare --input docs/*.txt corpus.jsonl --output data/my_corpus
    dist-train data prepare --corpus python-stdlib --output data/pystd

Uses megatron-core's own ``IndexedDatasetBuilder``, so the files load in Megatron-LM too. One document
per text file or per JSONL line (its ``"text"`` field); each document ends with one EOD id (the tokenizer's; not
added again when the tokenizer's own post-processor already appended it).
Text files are read as bytes with no newline translation (``\r`` is kept): the byte tokenizer takes those bytes as
they are (valid UTF-8 or not), a tokenizer.json decodes them as UTF-8. The
sidecar PREFIX.meta.json (:mod:`.sidecar`) records the tokenizer, its fingerprint, vocabulary size and EOD id, and the
XXH3-64 digest of the token stream (the ``.bin`` bytes): a checkpoint records it, so a resume notices a dataset
re-prepared from other text even when its sample count did not change. PREFIX.doc_hashes (:mod:`.document_hashes`)
holds each document's 8-byte content hash: the pre-flight finds the validation documents the training data holds too.
"""
from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
import xxhash

from .datasets import megatron_indexed_dataset
from .document_hashes import document_hash, write_document_hashes
from .sidecar import DIGEST_ALGORITHM, write_sidecar
from .tokenizer import get_tokenizer


def python_stdlib_files(max_bytes: int = 8 << 20) -> list[Path]:
    """A real text corpus present on every machine: this interpreter's standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if any(part in ("site-packages", "test", "tests", "idlelib") for part in p.relative_to(root).parts):
            continue
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if size == 0:
            continue
        files.append(p)
        total += size
        if total >= max_bytes:
            break
    if not files:
        raise ValueError(f"no Python sources found under {root} for the python-stdlib corpus")
    return files


def check_inputs(paths: Iterable[Path]) -> None:
    """Every input is a readable file, checked before anything is written (ValueError naming the first that
    is not)."""
    for p in map(Path, paths):
        if p.is_dir():
            raise ValueError(f"--input {p}: is a directory; give its files (e.g. {p}/*.txt {p}/*.jsonl)")
        if not p.is_file():
            raise ValueError(f"--input {p}: no such file")


def iter_documents(paths: Iterable[Path]) -> Iterator[Union[str, bytes]]:
    """Each input's documents: a JSONL line's "text" (str), a text file's raw bytes (the tokenizer decodes them:
    the byte tokenizer keeps every byte exactly, a tokenizer.json reads UTF-8)."""
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ValueError(f"--input {p}: no such file")
        if p.suffix in (".jsonl", ".json"):
            with p.open("rb") as f:
                for n, raw in enumerate(f, 1):
                    try:  # JSON is UTF-8: an invalid byte was replaced by U+FFFD silently (the text changed unsaid)
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{p}:{n}: not valid UTF-8 (byte {e.start} of the line: {e.reason}); JSON text "
                                         "is UTF-8") from None
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        record = None
                    # a record without a string "text" was skipped silently: the corpus lost documents unsaid
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{p}:{n}: not a JSON object with a 'text' field (a string)")
                    if record["text"]:
                        yield record["text"]
        else:
            yield p.read_bytes()


def document_ids(tok, text: Union[str, bytes]) -> list[int]:
    """``text``'s token ids ending in exactly one EOD: a tokenizer.json whose post-processor already appends its EOS
    (the EOD id) would otherwise end every document with two, an empty document between every pair."""
    ids = tok.encode(text)
    return ids if ids and ids[-1] == tok.eod_id else ids + [tok.eod_id]


def prepare_indexed(inputs: list[Path], output_prefix: str, tokenizer: str = "byte",
                    eod_token: Optional[str] = None) -> dict:
    """Tokenize ``inputs`` into ``output_prefix``.bin/.idx (+ .meta.json); returns {"prefix", "documents",
    "tokens", "vocab_size", "eod_id", "max_token_id", "tokenizer", "tokenizer_fingerprint", "digest"}. eod_token: the EOD token's text for a
    tokenizer.json (None: its recognised EOS, else ValueError). An existing dataset at ``output_prefix`` is never
    written over (ValueError)."""

    # a complete dataset: runs may train on it and resume from it (their checkpoints record its digest); a lone
    # .bin or .idx is an interrupted build, rebuilt
    if all(Path(f"{output_prefix}{suffix}").exists() for suffix in (".bin", ".idx")):
        raise ValueError(f"{output_prefix}: {output_prefix}.bin and .idx already exist (a dataset runs may train on "
                         "or resume from); choose a new output prefix, or delete them first")
    check_inputs(inputs)
    IndexedDatasetBuilder = megatron_indexed_dataset().IndexedDatasetBuilder
    tok = get_tokenizer(tokenizer, eod_token)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.int32
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = f"{out}.bin.tmp{os.getpid()}", f"{out}.idx.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    digest = xxhash.xxh3_64()  # of exactly the bytes the .bin gets, in order
    doc_hashes = array.array("Q")  # 8 B per document: PREFIX.doc_hashes
    n_docs = n_tokens = max_id = 0
    try:
        for text in iter_documents(inputs):
            ids = document_ids(tok, text)
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            tokens = np.asarray(ids, dtype=dtype)
            digest.update(tokens.tobytes())
            doc_hashes.append(document_hash(tokens))  # from the array: a list's conversion costs more than the hash
            builder.end_document()
            n_docs += 1
            n_tokens += len(ids)
            max_id = max(max_id, max(ids))
        if n_docs == 0:
            raise ValueError(f"no documents found in {', '.join(map(str, inputs))}")
        builder.finalize(tmp_idx)
    except BaseException:  # a bad JSONL line, Ctrl-C: no half-written temporaries left beside the output
        builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    info = {"tokenizer": tokenizer, "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id, "max_token_id": max_id, "documents": n_docs, "tokens": n_tokens, "digest": f"{DIGEST_ALGORITHM}:{digest.hexdigest()}"}
    write_sidecar(out, info)
    write_document_hashes(out, np.frombuffer(doc_hashes, dtype=np.uint64), info["digest"])
    # rename last, .idx (what readers look for) at the very end: a reader never sees a half-written dataset
    os.replace(tmp_bin, f"{out}.bin")
    os.replace(tmp_idx, f"{out}.idx")
    return {"prefix": str(out), **info}


def ensure_prepared(prefix: str, prepare: Optional[str], tokenizer: str = "byte") -> None:
    """Build the dataset at ``prefix`` from a named corpus when it is missing (demo convenience). Two jobs started
    at once on a fresh machine (two rank 0s) build it once: the build holds an exclusive lock on
    ``prefix.prepare.lock``, and a job that waited for it finds the other's dataset and uses it (without the lock
    both built, and the later one met the earlier one's finished files and stopped with 'already exist')."""
    if _prepared(prefix):
        return
    if prepare is None:
        raise ValueError(f"data.path = {prefix}: {prefix}.bin/.idx not found; build it with "
                         f"'dist-train data prepare --input FILES --output {prefix}' or set data.prepare: python-stdlib")
    if prepare != "python-stdlib":
        raise ValueError(f"data.prepare = {prepare!r}: valid values are python-stdlib or null")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if _prepared(prefix):  # another job built it while this one waited
            return
        # Say it: a job started with `ray job submit --working-dir .` does not get git-ignored files such as
        # data_cache/, so the corpus is rebuilt inside the job's copy unless data.path is absolute.
        print(f"dist-train: data.path {prefix}: no {prefix}.bin/.idx under {Path.cwd()}: building the python-stdlib "
              f"corpus there now (data.prepare); to reuse a prepared dataset give data.path as an absolute path",
              file=sys.stderr, flush=True)
        prepare_indexed(python_stdlib_files(), prefix, tokenizer)


def _prepared(prefix: str) -> bool:
    """Whether a complete dataset is at ``prefix`` (its .idx is renamed into place last)."""
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()
