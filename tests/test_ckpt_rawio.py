"""Raw shard I/O (no processes): the checksum module (XXH3-64 and legacy CRC-32 records), block I/O with
on-the-fly block digests and write-back windows, the reader's request planning (direct reads into targets, scratch + copy for column
slices, non-contiguous or other-dtype targets), verification while reading, the old torch.save shard format,
and that a verified load reads each shard only once.
Multi-rank resharding of sharded (DTensor) chunks through the same reader is in test_ckpt_dist.py."""
from __future__ import annotations

import ctypes
import errno
import os
import random
import time
import zlib
from pathlib import Path

import pytest
import torch
import xxhash
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dist_train.checkpoint import CheckpointManager, blockio, checksum, manifest
from dist_train.checkpoint.blockio import Segment, cover_blocks, read_file, write_file
from dist_train.checkpoint.storage import (RAW_FORMAT, ChecksumWriter, CorruptCheckpointError, SafeReader,
                                           box_byte_range, bytes_block_digests, file_block_digests)
from tests.test_ckpt_common import CkptCfg, build, eval_outputs, flip_byte, seed_rank, shard_files, train_steps


def test_checksum_module_streaming_records_and_legacy_crc32(tmp_path):
    rng = random.Random(1)
    data = rng.randbytes(5000)
    # published reference values, independent of our code: XXH3-64("") and CRC-32("abc")
    assert checksum.digest(b"") == "2d06800538d394c2" and checksum.digest(b"abc", "crc32") == "352441c2"
    for algorithm, ref in (("xxh3_64", xxhash.xxh3_64_hexdigest), ("crc32", lambda b: f"{zlib.crc32(b):08x}")):
        for _ in range(20):  # feeding a block in arbitrary pieces == one shot (what the I/O threads rely on)
            h, pos = checksum.new_hasher(algorithm), 0
            while pos < len(data):
                step = rng.randint(1, 700)
                h.update(memoryview(data)[pos:pos + step])
                pos += step
            assert h.hexdigest() == ref(data) == checksum.digest(data, algorithm)
    assert len(checksum.digest(data)) == 16 and len(checksum.digest(data, "crc32")) == 8

    rec = bytes_block_digests(data, block=1024)
    assert rec == {"bytes": 5000, "block": 1024, "checksum": "xxh3_64",
                   "digests": [xxhash.xxh3_64_hexdigest(data[i:i + 1024]) for i in range(0, 5000, 1024)]}
    (tmp_path / "f").write_bytes(data)
    assert file_block_digests(tmp_path / "f", 1024) == rec
    legacy = {"bytes": 5000, "block": 1024,
              "crc32": [f"{zlib.crc32(data[i:i + 1024]):08x}" for i in range(0, 5000, 1024)]}
    assert file_block_digests(tmp_path / "f", 1024, "crc32")["digests"] == legacy["crc32"]
    assert checksum.record_digests(rec) == ("xxh3_64", rec["digests"])
    assert checksum.record_digests(legacy) == ("crc32", legacy["crc32"])
    assert checksum.mismatched_blocks(rec["digests"], {0: rec["digests"][0], 3: "0" * 16, 7: "x"}) == [3, 7]
    with pytest.raises(ValueError, match=r"'sha1' is not supported \(supported: crc32, xxh3_64\)"):
        checksum.record_digests({**rec, "checksum": "sha1"})
    with pytest.raises(ValueError, match=r"lists 4 xxh3_64 digests for 5000 bytes in blocks of 1024 \(= 5 blocks\)"):
        checksum.record_digests({**rec, "digests": rec["digests"][:4]})
    with pytest.raises(ValueError, match="no digests"):
        checksum.record_digests({"bytes": 5000, "block": 1024})
    with pytest.raises(ValueError, match="not supported"):
        checksum.new_hasher("md5")


def test_block_io_round_trip_partial_verified_reads_any_thread_count(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "f"
    for _ in range(60):
        block = rng.choice([16, 64, 100])
        bufs = [bytearray(rng.randbytes(rng.randint(0, 300))) for _ in range(rng.randint(1, 8))]
        segs, off = [], 0
        for b in bufs:  # half eager views, half lazy sources (how the writer defers device-to-host copies)
            segs.append(Segment(off, len(b), memoryview(b) if rng.random() < .5 else (lambda b=b: memoryview(b))))
            off += len(b)
        window = rng.choice([0, block, 3 * block, 1000, blockio.WINDOW])  # page recycling must not change bytes
        rec = write_file(path, segs, off, threads=rng.randint(1, 4), block=block, window=window)
        data = path.read_bytes()
        assert data == b"".join(bufs)
        expected = [xxhash.xxh3_64_hexdigest(data[i:i + block]) for i in range(0, off, block)]
        assert rec == {"bytes": off, "block": block, "checksum": "xxh3_64", "digests": expected}
        legacy = [f"{zlib.crc32(data[i:i + block]):08x}" for i in range(0, off, block)]  # old records' algorithm

        picks, pos = [], 0  # random disjoint ranges, read with the filler that completes their blocks
        while pos < off:
            a = rng.randint(pos, off)
            b = rng.randint(a, min(off, a + 250))
            if b > a and rng.random() < .6:
                picks.append((a, b))
            pos = b + rng.randint(0, 50)
        outs = [bytearray(b - a) for a, b in picks]
        want = [Segment(a, b - a, memoryview(o)) for (a, b), o in zip(picks, outs)]
        algorithm, ref = rng.choice([("xxh3_64", expected), ("crc32", legacy)])
        got = read_file(path, cover_blocks(want, off, block), threads=rng.randint(1, 4), verify=True, size=off,
                        block=block, algorithm=algorithm)
        assert [bytes(o) for o in outs] == [data[a:b] for a, b in picks]
        assert set(got) == {i // block for a, b in picks for i in range(a, b)}
        assert all(d == ref[k] for k, d in got.items())
    with pytest.raises(ValueError, match="tile"):
        write_file(path, [Segment(0, 4, memoryview(bytearray(4))), Segment(6, 4, memoryview(bytearray(4)))], 10)
    with pytest.raises(ValueError, match="overlap"):
        cover_blocks([Segment(0, 4, None), Segment(2, 4, None)], 10, 4)
    with pytest.raises(EOFError, match="truncated"):
        read_file(path, [Segment(off, 8, memoryview(bytearray(8)))])


@pytest.mark.parametrize("failing", [0, 2])
def test_a_failing_span_fails_the_write_only_after_every_other_span_ended(tmp_path, failing):
    """The calling thread writes the first span itself and the pool the others: a source failing in either
    (``failing``: the span) surfaces from write_file, and not before the other spans stopped using their buffers."""
    ended = []

    def source(i: int):
        def resolve() -> memoryview:
            if i == failing:
                raise RuntimeError(f"span {i}: source gone")
            time.sleep(0.05)  # still writing when the failing span raises
            ended.append(i)
            return memoryview(bytearray(64))
        return resolve

    segs = [Segment(64 * i, 64, source(i)) for i in range(3)]
    with pytest.raises(RuntimeError, match=f"span {failing}: source gone"):
        write_file(tmp_path / "f", segs, 192, threads=3, block=64)
    assert sorted(ended) == [i for i in range(3) if i != failing]


def test_write_back_windows_recycle_page_cache_and_report_errors(tmp_path, monkeypatch):
    """Writes start write-back of each finished window, wait for and drop the one before, and drop the whole
    (clean) file after the fsync; reads leave the page cache alone. Offsets are exact."""
    path, data = tmp_path / "f", random.Random(3).randbytes(10_000)
    advice, syncs = [], []
    real_fadvise, real_sfr = blockio.os.posix_fadvise, blockio._sync_file_range()
    if real_sfr is None:
        pytest.skip("libc has no sync_file_range (not Linux): writes are not recycled there")
    monkeypatch.setattr(blockio.os, "posix_fadvise",
                        lambda fd, off, n, adv: advice.append((off, n, adv)) or real_fadvise(fd, off, n, adv))
    monkeypatch.setattr(blockio, "_sync_file_range",
                        lambda: lambda fd, off, n, flags: syncs.append((off, n, flags)) or real_sfr(fd, off, n, flags))
    rec = write_file(path, [Segment(0, len(data), memoryview(bytearray(data)))], len(data), block=512, window=2048)
    assert path.read_bytes() == data and rec["digests"][0] == xxhash.xxh3_64_hexdigest(data[:512])
    drop, start, wait = os.POSIX_FADV_DONTNEED, 2, 1 | 2 | 4
    assert syncs == [(0, 2048, start), (2048, 2048, start), (0, 2048, wait), (4096, 2048, start),
                     (2048, 2048, wait), (6144, 2048, start), (4096, 2048, wait)]
    assert advice == [(0, 2048, drop), (2048, 2048, drop), (4096, 2048, drop), (0, 0, drop)]

    advice.clear()
    out = bytearray(len(data))
    read_file(path, [Segment(0, len(data), memoryview(out))], block=512, verify=True, size=len(data))
    assert out == data and advice == [(0, len(data), os.POSIX_FADV_SEQUENTIAL)]  # reads keep their pages

    advice.clear()
    syncs.clear()
    write_file(path, [Segment(0, len(data), memoryview(bytearray(data)))], len(data), block=512, window=0)
    assert advice == [] and syncs == []  # window 0: plain writes

    def failing(fd, off, n, flags):  # the disk reports an error during write-back
        ctypes.set_errno(errno.EIO)
        return -1
    monkeypatch.setattr(blockio, "_sync_file_range", lambda: failing)
    with pytest.raises(OSError, match=r"f: write-back of bytes \[0, 2048\) failed: Input/output error"):
        write_file(path, [Segment(0, len(data), memoryview(bytearray(data)))], len(data), block=512, window=2048)


def test_box_byte_range():
    assert box_byte_range([6, 10], [2, 0], [3, 10], 8) == (160, 240)      # rows: contiguous
    assert box_byte_range([6, 10], [4, 3], [1, 5], 4) == (172, 20)        # part of one row
    assert box_byte_range([6, 10], [0, 3], [6, 4], 4) is None            # columns: strided
    assert box_byte_range([2, 3, 4], [1, 1, 0], [1, 2, 4], 2) == (32, 16)
    assert box_byte_range([], [], [], 4) == (0, 4)                        # 0-dim


class _Planner:
    """The two LoadPlanner calls a StorageReader makes, over a dict of (already narrowed) targets."""

    def __init__(self, targets: dict[str, torch.Tensor]) -> None:
        self.targets, self.committed = targets, []

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.targets[item.dest_index.fqn]

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        self.committed.append(item.dest_index.fqn)


def _read_item(dest: str, src: str, src_chunk, offsets, lengths) -> ReadItem:
    return ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(dest, [0] * len(lengths)),
                    dest_offsets=torch.Size([0] * len(lengths)), storage_index=MetadataIndex(src, src_chunk),
                    storage_offsets=torch.Size(offsets), lengths=torch.Size(lengths))


def _save_raw(path: Path, state: dict) -> ChecksumWriter:
    writer = ChecksumWriter(path, thread_count=2)
    dcp.save(state, storage_writer=writer, no_dist=True)
    return writer


def test_reader_plans_direct_and_scratch_reads_and_verifies_while_reading(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64, generator=g)
    state = {"w": w.clone(), "h": torch.randn(5, generator=g).to(torch.bfloat16), "s": torch.tensor(3.5),
             "e": torch.empty(0, 3)}
    writer = _save_raw(tmp_path / "c", state)
    assert set(writer.records) == {"__0_0.distcp", ".metadata"}
    shard = tmp_path / "c" / "__0_0.distcp"
    assert shard.stat().st_size == 6 * 10 * 8 + 5 * 2 + 4  # raw bytes back to back, nothing else

    colt = torch.zeros(4, 6, dtype=torch.float64)
    targets = {"rows": torch.zeros(3, 10, dtype=torch.float64),   # contiguous rows -> straight into the target
               "top": torch.zeros(2, 10, dtype=torch.float64),    # a second disjoint request of the same chunk
               "cols": torch.zeros(6, 4, dtype=torch.float64),    # columns: whole chunk to scratch, then narrow
               "rows32": torch.zeros(2, 10),                     # other dtype: scratch + converting copy
               "colt": colt.t(),                                 # non-contiguous target: scratch + copy
               "h": torch.zeros(5, dtype=torch.bfloat16), "s": torch.tensor(0.0), "e": torch.ones(0, 3)}
    items = [_read_item("rows", "w", [0, 0], [2, 0], [3, 10]), _read_item("top", "w", [0, 0], [0, 0], [2, 10]),
             _read_item("h", "h", [0], [0], [5]), _read_item("s", "s", [], [], []), _read_item("e", "e", [0, 0], [0, 0], [0, 3])]
    other = [_read_item("cols", "w", [0, 0], [0, 3], [6, 4]), _read_item("rows32", "w", [0, 0], [4, 0], [2, 10]),
             _read_item("colt", "w", [0, 0], [0, 0], [6, 4])]
    for plan_items in (items, other):
        reader = SafeReader(tmp_path / "c", records=writer.records, threads=2)
        reader.set_up_storage_reader(reader.read_metadata(), True)
        planner = _Planner(targets)
        reader.read_data(LoadPlan(plan_items), planner).wait()
        assert sorted(planner.committed) == sorted(i.dest_index.fqn for i in plan_items)
    assert torch.equal(targets["rows"], w[2:5]) and torch.equal(targets["top"], w[:2])
    assert torch.equal(targets["cols"], w[:, 3:7]) and torch.equal(colt.t(), w[:, :4])
    assert torch.equal(targets["rows32"], w[4:6].float())
    assert torch.equal(targets["h"], state["h"]) and targets["s"].item() == 3.5

    flip_byte(shard, offset=6 * 10 * 8 + 3)  # inside "h"
    reader = SafeReader(tmp_path / "c", records=writer.records)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    with pytest.raises(CorruptCheckpointError, match=r"__0_0.distcp: xxh3_64 checksum mismatch in bytes \[0, 494\) "
                                                     r"\(corrupt\); tensors stored there: .*h"):
        reader.read_data(LoadPlan(items[:1]), _Planner(targets))  # the damage is in the block it reads


def test_stock_dcp_reader_refuses_raw_shards_and_old_shards_still_load(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4)}
    _save_raw(tmp_path / "raw", state)
    assert all(i.transform_descriptors == [RAW_FORMAT] for i in
               SafeReader(tmp_path / "raw").read_metadata().storage_data.values())
    with pytest.raises(BaseException, match="Unknown extension.*dist-train-raw"):  # never misread raw bytes as torch.save records
        dcp.load({"w": torch.zeros(3, 4)}, storage_reader=FileSystemReader(tmp_path / "raw"), no_dist=True)
    dcp.save(state, storage_writer=FileSystemWriter(tmp_path / "old"), no_dist=True)  # torch.save shards
    out = {"w": torch.zeros(3, 4)}
    dcp.load(out, storage_reader=SafeReader(tmp_path / "old", threads=2), no_dist=True)
    assert torch.equal(out["w"], state["w"])


def test_verified_load_reads_shards_once_and_names_damage(tmp_path, monkeypatch):
    seed_rank(0)
    model, opt, sched = build()
    train_steps(model, opt, sched, 1, 2)
    mgr = CheckpointManager(CkptCfg(dir=str(tmp_path)), run_dir=tmp_path, io_threads=3)
    mgr.save(2, model, opt, sched)
    ckpt = tmp_path / "step_2"
    assert manifest.read_manifest(ckpt)["shard_format"] == RAW_FORMAT
    whole_file_checks = []
    real = manifest.file_block_digests
    monkeypatch.setattr(manifest, "file_block_digests",
                        lambda p, *a: whole_file_checks.append(Path(p).name) or real(p, *a))
    fresh, opt2, _ = build(seed=5)
    mgr.load(ckpt, fresh, opt2, verify=True)
    assert torch.equal(eval_outputs(fresh), eval_outputs(model))
    assert whole_file_checks and not [n for n in whole_file_checks if n.endswith(".distcp")], whole_file_checks

    shard = shard_files(ckpt)[0]
    flip_byte(shard, offset=shard.stat().st_size - 1)
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name}: xxh3_64 checksum mismatch.*tensors? stored there"):
        mgr.load(ckpt, build(seed=6)[0], verify=True)
    monkeypatch.setattr(blockio.os, "preadv", lambda *a: 0)  # a file that ends early is reported, not loaded
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        mgr.load(ckpt, build(seed=6)[0], verify=False)
