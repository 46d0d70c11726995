"""The on-disk layout of a checkpoint directory, its manifest, and verification.

    <ckpt_dir>/
      latest                     "step_20\\n" (written via temp + rename; a hint for humans and tools)
      step_10/                   complete: manifest.json exists and was written last, then the dir renamed
      step_20/
        manifest.json            files + sizes + XXH3-64 per 4 MiB block, layout, config, code version, tensor table, self-checksum
        .metadata                DCP metadata (pickle written by DCP; read with an allow-list unpickler)
        __0_0.distcp …           DCP shards (model + optimizer tensors), one or more per rank
        train_state.json         step, extra, scheduler, non-tensor optimizer values (JSON)
        rng_rank00000.json …     every rank's RNG states (JSON)
      step_30.tmp/               a save in progress or one that died: never counts

A checkpoint is *complete* when ``step_N/manifest.json`` parses and its self-checksum matches; it is *valid*
when, in addition, every listed file exists with the recorded size and block checksums (the algorithm each
file record names: ``"checksum": "xxh3_64"``, or CRC-32 for records written before it, see ``checksum``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from dist_train.checkpoint import checksum
from dist_train.checkpoint.storage import (RAW_FORMAT, CheckpointError, CheckpointIOError, damage_message,
                                           file_block_digests, is_plain_file_name, load_dcp_metadata, transient_io,
                                           write_file_durable)

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
LATEST = "latest"
DCP_METADATA = ".metadata"
FORMAT = "dist-train-checkpoint/1"
_STEP_RE = re.compile(r"^step_(\d+)$")

PathLike = Union[str, os.PathLike]


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def is_step_dir_name(name: str) -> bool:
    """True for a committed checkpoint directory's name, ``step_N`` (not ``step_N.tmp`` and the like)."""
    return bool(_STEP_RE.match(name))


def rng_file_name(rank: int) -> str:
    return f"rng_rank{rank:05d}.json"


def code_version() -> str:
    """``git describe --always --dirty`` of the source tree when it is a git checkout, else the package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"dist-train {version('dist-train')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _body_checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(ckpt: PathLike, body: dict, atomic: bool = True) -> None:
    """Write ``manifest.json`` (body + sha256 of its canonical JSON) durably; this is the commit record.
    ``atomic=False`` inside a ``step_N.tmp`` directory that is fsynced and renamed afterwards."""
    doc = {"format": FORMAT, "body": body, "sha256": _body_checksum(body)}
    write_file_durable(Path(ckpt) / MANIFEST, json.dumps(doc, indent=1).encode(), atomic=atomic)


def read_manifest(ckpt: PathLike) -> dict:
    """Parse and self-check ``ckpt/manifest.json``; return its body. Raises ``CheckpointError`` naming the file."""
    path = Path(ckpt) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint was never committed)") from None
    except OSError as e:
        if transient_io(e):
            raise CheckpointIOError(f"{path}: I/O error reading the manifest ({e})") from None
        raise CheckpointError(f"{path}: unreadable or truncated manifest ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated manifest ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("body"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if _body_checksum(doc["body"]) != doc.get("sha256"):
        raise CheckpointError(f"{path}: manifest checksum mismatch (the manifest was modified or damaged)")
    # the self-checksum is no signature: a manifest from elsewhere must not make verification read, and vouch for,
    # a file outside the checkpoint directory
    for name in doc["body"].get("files") or {}:
        if not is_plain_file_name(name):
            raise CheckpointError(f"{path}: lists file {name!r}, which is not a plain file name inside the checkpoint "
                                  "directory")
    return doc["body"]


def tensors_in_range(ckpt: Path, file_name: str, start: int, end: int) -> list[str]:
    """Names of the tensors DCP stored in ``file_name`` overlapping bytes [start, end) (from ``.metadata``,
    read safely); empty when the metadata itself is unreadable."""
    try:
        md = load_dcp_metadata(ckpt / DCP_METADATA)
    except CheckpointError:
        return []
    names = []
    for index, info in md.storage_data.items():
        if info.relative_path == file_name and info.offset < end and info.offset + info.length > start:
            names.append(index.fqn)
    return sorted(set(names))


def check_file(ckpt: Path, name: str, rec: dict, content: bool = True) -> Optional[str]:
    """None when ``ckpt/name`` matches its record (size, and with ``content`` every block's checksum), else a
    one-line problem naming the file (and, for a DCP shard, the damaged tensors). An I/O error that may pass
    (``storage.transient_io``) raises ``CheckpointIOError`` instead: it says nothing about the bytes."""
    path = ckpt / name
    try:
        algorithm, expected = checksum.record_digests(rec)
    except ValueError as e:
        return f"{path}: manifest record: {e}"
    try:
        size = path.stat().st_size
        if size != rec["bytes"]:
            return f"{path}: size {size} bytes, manifest says {rec['bytes']} (truncated or appended)"
        if not content:
            return None
        got = file_block_digests(path, rec["block"], algorithm)["digests"]
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as e:
        if transient_io(e):
            raise CheckpointIOError(f"{path}: I/O error ({e.strerror or e})") from None
        return f"{path}: unreadable ({e.strerror or e})"
    bad = checksum.mismatched_blocks(expected, dict(enumerate(got)))
    if not bad:
        return None
    block = rec["block"]
    start, end = bad[0] * block, min(size, (bad[-1] + 1) * block)
    names = tensors_in_range(ckpt, name, start, end) if name.endswith(".distcp") else []
    return damage_message(path, start, end, names, algorithm)


def shards_verified_while_loading(body: dict) -> set[str]:
    """Files whose bytes the loader checks against their checksums while reading them (raw-format shards);
    every other file is checked in full before loading."""
    if body.get("shard_format") != RAW_FORMAT:
        return set()
    return {n for n in body["files"] if n.endswith(".distcp")}


def verify_files(ckpt: PathLike, body: dict, names: Optional[Iterable[str]] = None, threads: int = 2,
                 size_only: Iterable[str] = ()) -> list[str]:
    """Check the listed files (all by default; those in ``size_only`` for existence and size only); return
    the problems (empty when valid)."""
    ckpt = Path(ckpt)
    files = body["files"]
    todo = sorted(files) if names is None else sorted(names)
    size_only = set(size_only)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # hashing releases the GIL: 2 threads ≈ 2 cores
        problems = list(pool.map(lambda n: check_file(ckpt, n, files[n], content=n not in size_only), todo))
    if DCP_METADATA in todo and not problems[todo.index(DCP_METADATA)]:
        problems.append(metadata_problem(ckpt))
    return [p for p in problems if p]


def metadata_problem(ckpt: PathLike) -> Optional[str]:
    """None when ``ckpt/.metadata`` passes the allow-list unpickler (``storage.load_dcp_metadata``), else the
    reason: a checkpoint whose checksums were recomputed over refused metadata is still unusable."""
    try:
        load_dcp_metadata(Path(ckpt) / DCP_METADATA)
    except CheckpointError as e:
        return str(e)
    return None


def nonfinite_tensors(ckpt: PathLike, body: dict, limit: int = 5) -> list[str]:
    """Problems naming stored floating tensors that hold NaN or ±inf (raw-format shards; at most ``limit``).
    Reads every shard byte once, one stored chunk at a time."""
    if body.get("shard_format") != RAW_FORMAT:
        return []
    ckpt = Path(ckpt)
    md = load_dcp_metadata(ckpt / DCP_METADATA)
    bad: list[str] = []
    for index, info in sorted(md.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        dtype = md.state_dict_metadata[index.fqn].properties.dtype
        if not dtype.is_floating_point or index.fqn in bad or not info.length:
            continue
        with open(ckpt / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = bytearray(f.read(info.length))
        if len(data) == info.length and not bool(torch.isfinite(torch.frombuffer(data, dtype=dtype)).all()):
            bad.append(index.fqn)
            if len(bad) >= limit:
                break
    return [f"{ckpt}: tensor '{name}' holds NaN/inf values" for name in bad]


def verify_checkpoint(ckpt: PathLike) -> list[str]:
    """All problems of one checkpoint directory (manifest, then every file, the DCP metadata, then NaN/inf
    in stored tensors); empty when it is valid."""
    try:
        body = read_manifest(ckpt)
    except CheckpointError as e:
        return [str(e)]
    problems = verify_files(ckpt, body)
    if problems:
        return problems
    return nonfinite_tensors(ckpt, body)


def list_checkpoints(root: PathLike) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every committed-looking ``step_N`` directory under ``root``, newest first
    (``.tmp`` dirs never count). Completeness is checked by the caller with ``read_manifest``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def complete_checkpoints(root: PathLike) -> list[tuple[int, Path]]:
    """Newest-first ``(step, dir)`` whose manifest is present and self-consistent."""
    out = []
    for step, p in list_checkpoints(root):
        try:
            read_manifest(p)
        except CheckpointError:
            continue
        out.append((step, p))
    return out


def write_latest(root: PathLike, name: str) -> None:
    write_file_durable(Path(root) / LATEST, (name + "\n").encode())


def read_latest(root: PathLike) -> Optional[str]:
    try:
        return (Path(root) / LATEST).read_text().strip() or None
    except OSError:
        return None


def tensor_table(body: dict) -> list[dict[str, Any]]:
    """``[{"name", "shape", "dtype", "bytes"}]`` sorted by name, from the manifest."""
    return [dict(name=k, **v) for k, v in sorted(body.get("tensors", {}).items())]
