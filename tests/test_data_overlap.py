"""Held-out documents that are also training documents (data/overlap.py, data/document_hashes.py): recorded by
`dist-train data prepare` as 8-byte content hashes in PREFIX.doc_hashes, counted by the pre-flight, refused over
data.valid_overlap_max with one line (exit 2), short boilerplate not counted, datasets without the file hashed from
their .bin."""
import json
from pathlib import Path

import numpy as np
import pytest

from dist_train.cli import main
from dist_train.config import ConfigError, config_from_dict
from dist_train.data import document_hashes
from dist_train.data.datasets import dataset_identity, indexed_part
from dist_train.data.document_hashes import (compute_document_hashes, dataset_document_hashes,
                                             document_hashes_path, read_document_hashes)
from dist_train.data.integrity import IndexInfo, read_index
from dist_train.data.overlap import Checked, share_tokens, shared_documents
from dist_train.data.prepare import prepare_indexed
from dist_train.data.sidecar import read_sidecar
from dist_train.preflight import check_data
from tests.trainer_utils import run_cli

#: distinct documents of 90-odd bytes (byte tokenizer: one token each, + EOD), long enough to be counted
DOCS = [f"document {i}: " + " ".join(f"w{i * 7 + j}" for j in range(20)) for i in range(12)]
BOILERPLATE = "Thanks!"  # 8 tokens with its EOD: repeats legitimately


def _prepare(tmp_path: Path, name: str, texts: list[str]) -> str:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = str(tmp_path / name)
    prepare_indexed([src], prefix)
    return prefix


def _cfg(tmp_path: Path, train: str, valid: str = None, split: str = None, eval_every: int = 2,
         vocab_size: int = 257, **data):
    return config_from_dict({
        "run": {"dir": str(tmp_path / "run")}, "model": {"vocab_size": vocab_size},
        "data": {"source": "indexed", "path": train, "seq_len": 16, "valid_path": valid, "split": split, **data},
        "train": {"eval_every": eval_every, "global_batch": 4, "micro_batch": 4,
                  **({"eval_steps": 1} if eval_every else {})}})


def _refusal(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        check_data(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_prepare_records_one_hash_per_document_that_the_bin_reproduces(tmp_path):
    prefix = _prepare(tmp_path, "train", DOCS[:5])
    info = read_index(prefix)
    recorded = read_document_hashes(prefix, 5, read_sidecar(prefix)["digest"])
    assert isinstance(recorded, np.ndarray) and len(set(recorded.tolist())) == 5
    assert document_hashes_path(prefix).stat().st_size == 32 + 8 * 5  # linear: 8 B per document
    np.testing.assert_array_equal(recorded, compute_document_hashes(prefix, info))
    # the same text in another dataset (other neighbours, other offsets) has the same hash
    other = _prepare(tmp_path, "other", [DOCS[7], DOCS[2]])
    assert read_document_hashes(other, 2, read_sidecar(other)["digest"])[1] == recorded[2]


def _document_hashes(prefix: str):
    """:func:`dataset_document_hashes` of the dataset at ``prefix`` as the pre-flight reads it."""
    return dataset_document_hashes(prefix, read_index(prefix), dataset_identity(prefix, read_sidecar(prefix)))


def test_a_hash_file_of_another_build_is_not_used_and_data_hash_writes_it_again(tmp_path):
    prefix = _prepare(tmp_path, "train", DOCS[:4])
    stale = _prepare(tmp_path, "stale", DOCS[4:8])  # same count, other text: its file beside train's .bin
    good = document_hashes_path(prefix).read_bytes()
    document_hashes_path(prefix).write_bytes(document_hashes_path(stale).read_bytes())
    hashes, source = _document_hashes(prefix)
    assert source == "computed: train.doc_hashes was hashed from another build of train.bin"
    np.testing.assert_array_equal(hashes, np.frombuffer(good[32:], dtype="<u8"))
    document_hashes_path(prefix).unlink()
    r = run_cli("data", "hash", prefix)
    assert r.returncode == 0, r.stderr
    assert document_hashes_path(prefix).read_bytes() == good
    assert _document_hashes(prefix)[1] == "file"


def test_shared_documents_counts_documents_and_tokens_and_skips_short_ones():
    train = np.array([5, 9, 11, 3], dtype=np.uint64)
    valid = np.array([9, 4, 3, 3, 5], dtype=np.uint64)
    lengths = np.array([100, 80, 70, 70, 2])
    o = shared_documents(train, valid, lengths, min_tokens=64)
    assert (o.shared, o.counted, o.shared_tokens, o.counted_tokens, o.short) == (3, 4, 240, 320, 1)
    assert shared_documents(train[:0], valid, lengths, 64).shared == 0
    # equal low bits (what the filter looks at) are not a match
    assert shared_documents(valid[:3] + np.uint64(1 << 40), valid, lengths, 64).shared == 0
    assert shared_documents(train, valid, lengths, 1000).counted == 0


@pytest.mark.parametrize("split", ["98,2,0", "1,1", "2,1,1", "1,1,1", "1,0", "0,1"])
def test_the_shares_the_overlap_check_compares_are_the_samples_the_dataset_reads(split):
    """share_tokens and indexed_part (what IndexedTokenDataset reads) have one definition: on uneven splits their
    ranges agree token for token, and a share indexed_part refuses as empty (or a stream without a sample) holds no
    sample for share_tokens either (one token: the neighbouring share's label)."""
    seq_len = 8
    for tokens in (0, 1, seq_len, seq_len + 1, 2 * seq_len, 2 * seq_len + 1, 3 * seq_len + 5, 101, 1000):
        index = IndexInfo(np.dtype(np.uint16), np.array([tokens], dtype=np.int32), np.zeros(1, dtype=np.int64), 2,
                          np.array([0, 1], dtype=np.int64))
        for part in ("train", "valid"):
            lo, hi = share_tokens(Checked("ds", index, None), seq_len, split, part)
            try:
                first, end = indexed_part("ds", tokens, seq_len, split, part)
            except ValueError:
                assert hi - lo == 1, (tokens, part, lo, hi)
                continue
            assert (lo, hi) == (first * seq_len, end * seq_len + 1) and hi <= tokens, (tokens, part)


def test_a_partial_overlap_is_refused_naming_both_paths_and_the_counts(tmp_path):
    train = _prepare(tmp_path, "train", DOCS[:10])
    valid = _prepare(tmp_path, "valid", [DOCS[10], DOCS[3], DOCS[11], DOCS[7]])
    msg = _refusal(_cfg(tmp_path, train, valid))
    tokens = len(DOCS[3]) + len(DOCS[7]) + 2
    total = sum(len(DOCS[i]) + 1 for i in (10, 3, 11, 7))
    assert msg.startswith(f"data.valid_path = {valid}: 2 of its 4 documents ({tokens} of {total} tokens) are also "
                          f"in the training data data.path = {train}, 50% > data.valid_overlap_max = 0 "), msg
    assert "data.valid_overlap_min_tokens = 64" in msg and "data.valid_overlap_max: 0.5" in msg
    # the knob: at the fraction it suggests the run goes on, just below it is refused
    check_data(_cfg(tmp_path, train, valid, valid_overlap_max=0.5))
    assert "data.valid_overlap_max = 0.49" in _refusal(_cfg(tmp_path, train, valid, valid_overlap_max=0.49))
    check_data(_cfg(tmp_path, train, valid, valid_overlap_max=1.0))  # 1: not checked


def test_disjoint_sets_and_repeated_short_boilerplate_pass(tmp_path):
    train = _prepare(tmp_path, "train", DOCS[:8] + [BOILERPLATE, ""])
    valid = _prepare(tmp_path, "valid", DOCS[8:] + [BOILERPLATE, BOILERPLATE])
    check_data(_cfg(tmp_path, train, valid))
    # counted once they are long enough for data.valid_overlap_min_tokens: 2 of the 6 held-out documents
    assert "2 of its 6 documents" in _refusal(_cfg(tmp_path, train, valid, valid_overlap_min_tokens=8))


def test_with_data_split_a_held_out_set_is_checked_against_the_training_share_only(tmp_path):
    """data.valid_path with data.split: training reads only the split's training share of data.path, so a held-out
    document that repeats one of the other shares (never trained on) is no overlap; one of the training share is."""
    train = _prepare(tmp_path, "train", DOCS[:10])  # ~95 tokens each: "50,0,50" trains on the first ~5 documents
    untrained = _prepare(tmp_path, "untrained", [DOCS[10], DOCS[9], DOCS[11]])
    check_data(_cfg(tmp_path, train, untrained, split="50,0,50"))
    assert "1 of its 3 documents" in _refusal(_cfg(tmp_path, train, untrained))  # no split: all of data.path trains
    trained = _prepare(tmp_path, "trained", [DOCS[10], DOCS[1], DOCS[11]])
    assert "1 of its 3 documents" in _refusal(_cfg(tmp_path, train, trained, split="50,0,50"))


def test_the_document_that_starts_the_validation_share_is_not_its_own_duplicate(tmp_path):
    """The training share's last label is the validation share's first token: a document starting exactly there is
    read by both shares (one token of it by training), yet it is one document, not a copy."""
    texts = [f"a unique document, number {i}: ".ljust(79, "x") for i in range(8)]  # 80 tokens each with the EOD
    prefix = _prepare(tmp_path, "unique", texts)
    # 639 // 16 = 39 samples, "50,50,0": training samples [0, 20), validation [20, 39) from token 320 = document 4
    check_data(_cfg(tmp_path, prefix, split="50,50,0"))
    repeated = _prepare(tmp_path, "repeated", texts[:5] + [texts[1]] + texts[6:])  # a real copy is still found
    assert "1 of the 3 documents of the validation share" in _refusal(_cfg(tmp_path, repeated, split="50,50,0"))


@pytest.mark.parametrize("key", ["data.path", "data.valid_path"])
def test_a_damaged_document_table_is_refused_naming_the_key_of_its_dataset(tmp_path, key):
    """The overlap check reads both datasets' document tables (data.path's for the documents data.split's training
    share reads); a damaged one is named by the key the config gives its dataset (Checked.key), whichever it is."""
    train = _prepare(tmp_path, "train", DOCS[:6])
    valid = _prepare(tmp_path, "valid", DOCS[6:9])
    damaged = train if key == "data.path" else valid
    idx = Path(damaged + ".idx")
    idx.write_bytes(idx.read_bytes()[:-8] + np.int64(99).tobytes())  # the table's last entry: not the sequence count
    msg = _refusal(_cfg(tmp_path, train, valid, split="2,0,1"))
    assert msg.startswith(f"{key} = {damaged}: {damaged}.idx document table does not run"), msg


def test_datasets_without_the_hash_file_or_a_sidecar_are_hashed_from_their_bin(tmp_path, monkeypatch, capsys):
    train = _prepare(tmp_path, "train", DOCS[:10])
    valid = _prepare(tmp_path, "valid", [DOCS[10], DOCS[3], DOCS[11], DOCS[7]])
    with_files = _refusal(_cfg(tmp_path, train, valid))
    assert capsys.readouterr().err == ""
    for prefix in (train, valid):  # prepared before the file existed
        document_hashes_path(prefix).unlink()
    assert _refusal(_cfg(tmp_path, train, valid)) == with_files
    # a large one (here: from 10 documents on) says that it is hashed at every start, and how to avoid it
    monkeypatch.setattr(document_hashes, "NOTE_DOCUMENTS", 10)
    assert _refusal(_cfg(tmp_path, train, valid)) == with_files
    note = capsys.readouterr().err.strip().splitlines()
    assert note == [f"dist-train: {train}: no train.doc_hashes; hashing its 10 documents from train.bin for the held-out "
                    f"overlap check (about 0 s, at every start); 'dist-train data hash {train}' writes the file once"]
    for prefix in (train, valid):  # built elsewhere: no sidecar either
        Path(prefix + ".meta.json").unlink()
    assert _refusal(_cfg(tmp_path, train, valid)) == with_files


def _bin_reads(monkeypatch) -> list[str]:
    """The names of the .bin files memory-mapped from now on: each is one read of the whole file (the token-id scan,
    the document hashing; the sampled fingerprint opens the file, 1 MiB, and is not counted)."""
    reads, memmap = [], np.memmap

    def counted(path, *a, **kw):
        if str(path).endswith(".bin"):
            reads.append(Path(str(path)).name)
        return memmap(path, *a, **kw)
    monkeypatch.setattr(np, "memmap", counted)
    return reads


@pytest.mark.parametrize("sidecar,hash_file,reads", [(False, False, 1), (False, True, 1), (True, False, 1),
                                                      (True, True, 0)])
def test_one_preflight_reads_each_bin_at_most_once(tmp_path, monkeypatch, sidecar, hash_file, reads):
    """A dataset without a sidecar has its .bin scanned for the token-id range; without a .doc_hashes file of its
    build the overlap check hashes its documents from the .bin: one read does both (it was two: for a 100 GB .bin a
    second long wait before any rank). With a sidecar and the file the .bin is not read at all. The refusal is the
    same line whatever the pre-flight read."""
    train = _prepare(tmp_path, "train", DOCS[:10])
    valid = _prepare(tmp_path, "valid", [DOCS[10], DOCS[3], DOCS[11], DOCS[7]])
    repeated = _prepare(tmp_path, "repeated", DOCS[:4] * 2)
    with_files = _refusal(_cfg(tmp_path, train, valid)), _refusal(_cfg(tmp_path, repeated, split="1,1,0"))
    for prefix in (train, valid, repeated):
        if not sidecar:  # built elsewhere (Megatron-LM's tools)
            Path(prefix + ".meta.json").unlink()
        if hash_file:  # dist-train data hash: the file of this build (its identity without a sidecar: the fingerprint)
            assert main(["data", "hash", prefix]) == 0
        else:
            document_hashes_path(prefix).unlink()
    read = _bin_reads(monkeypatch)
    assert _refusal(_cfg(tmp_path, train, valid)) == with_files[0]
    assert sorted(read) == sorted(["train.bin", "valid.bin"] * reads), read
    read.clear()  # under data.split, the one dataset too
    assert _refusal(_cfg(tmp_path, repeated, split="1,1,0")) == with_files[1]
    assert read == ["repeated.bin"] * reads, read


def test_without_the_overlap_check_no_document_is_hashed_and_refusals_stay_the_same(tmp_path, monkeypatch):
    """The token-id scan hashes documents only for the overlap check; its refusals (here: an id outside the
    vocabulary) and the overlap check's (a damaged document table, found before the .bin is read for hashing) are the
    lines they were, each dataset's .bin read once."""
    train = _prepare(tmp_path, "train", DOCS[:6])
    valid = _prepare(tmp_path, "valid", DOCS[6:9])
    for prefix in (train, valid):
        Path(prefix + ".meta.json").unlink()
        document_hashes_path(prefix).unlink()
    hashed = []
    scan = document_hashes.scan_document_hashes
    monkeypatch.setattr(document_hashes, "scan_document_hashes", lambda *a: hashed.append(a[0]) or scan(*a))
    read = _bin_reads(monkeypatch)
    check_data(_cfg(tmp_path, train, valid, eval_every=0))
    assert (read, hashed) == (["valid.bin", "train.bin"], []), (read, hashed)
    # the byte tokenizer's ids reach 255 (its EOD 256 aside): outside a vocabulary of 100
    off, on = (_refusal(_cfg(tmp_path, train, valid, eval_every=every, vocab_size=100)) for every in (0, 2))
    assert on == off and off.startswith(f"data.valid_path = {valid}: token id ") and "from a scan of valid.bin" in off
    idx = Path(valid + ".idx")
    idx.write_bytes(idx.read_bytes()[:-8] + np.int64(99).tobytes())
    read.clear()
    msg = _refusal(_cfg(tmp_path, train, valid, split="2,0,1"))
    assert msg.startswith(f"data.valid_path = {valid}: {valid}.idx document table does not run"), msg
    assert sorted(read) == ["train.bin", "valid.bin"], read


def test_duplicates_across_the_shares_of_data_split_are_refused(tmp_path):
    """data.split holds out the corpus's last share: a corpus with repeated documents repeats some of them there."""
    deduplicated = _prepare(tmp_path, "dedup", DOCS)
    check_data(_cfg(tmp_path, deduplicated, split="70,30,0"))
    repeated = _prepare(tmp_path, "repeated", DOCS[:9] + [DOCS[1], DOCS[5], DOCS[9]])
    msg = _refusal(_cfg(tmp_path, repeated, split="70,30,0"))
    # the last document is read only in part (the stream's tail short of a sample): not a held-out document
    assert msg.startswith(f"data.split = '70,30,0': 2 of the 2 documents of the validation share of data.path = "
                          f"{repeated} (") and "also in its training share" in msg, msg
    assert "deduplicate the corpus" in msg


def test_launch_refuses_an_overlapping_held_out_set_with_exit_2_before_any_rank(tmp_path):
    train = _prepare(tmp_path, "train", DOCS[:10] * 3)
    valid = _prepare(tmp_path, "valid", [DOCS[10], DOCS[3], DOCS[11], DOCS[7]] * 2)
    run_dir = tmp_path / "run"
    r = run_cli("launch", "configs/gpt_tiny.yaml", "--backend", "local", "--set", f"data.path={train}",
                "--set", f"data.valid_path={valid}", "--set", "train.eval_every=2", "--set", "train.eval_steps=1",
                "--set", "data.seq_len=16", "--set", f"run.dir={run_dir}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"data.valid_path = {valid}: 4 of its 8 documents" in lines[0], r.stderr[-2000:]
    assert not run_dir.exists()


def test_the_overlap_bench_finds_every_planted_copy(tmp_path, capsys):
    """`dist-train bench overlap` exits 1 unless both variants of the check (with and without PREFIX.doc_hashes) find
    exactly the copies it planted: run at a tiny size (what it measures is in docs/benchmarks/overlap.md)."""
    assert main(["bench", "overlap", "--train-docs", "3000", "--valid-docs", "300", "--overlap", "0.5",
                 "--repeats", "1", "--dir", str(tmp_path), "--json", str(tmp_path / "o.json")]) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["planted"] > 50 and set(result["found"].values()) == {result["planted"]}, result


def test_the_overlap_bench_refuses_more_planted_copies_than_training_documents(tmp_path, capsys):
    assert main(["bench", "overlap", "--train-docs", "10", "--valid-docs", "100", "--overlap", "0.5",
                 "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plants 50 copies of distinct training documents, more than --train-docs 10" in err
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_data_hash_into_a_directory_it_cannot_write_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """A shared, read-only dataset directory (simulated: this test may run as root, which ignores file modes)."""
    prefix = _prepare(tmp_path, "train", DOCS[:3])
    document_hashes_path(prefix).unlink()
    real_open = Path.open

    def read_only(self, mode="r", *a, **kw):
        if "w" in mode:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *a, **kw)
    monkeypatch.setattr(Path, "open", read_only)
    assert main(["data", "hash", prefix]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {prefix}.doc_hashes (Permission denied)" in err, err
    assert not document_hashes_path(prefix).exists() and not list(tmp_path.glob(".*"))  # no temp file left


def test_a_hash_file_this_user_cannot_read_is_not_used(tmp_path, monkeypatch):
    """Another user's `data hash` under umask 077 leaves a file others cannot open (simulated: this test may run as
    root): the check hashes the .bin instead of stopping with a traceback."""
    train = _prepare(tmp_path, "train", DOCS[:10])
    valid = _prepare(tmp_path, "valid", [DOCS[10], DOCS[3], DOCS[11], DOCS[7]])
    with_files = _refusal(_cfg(tmp_path, train, valid))
    real_open = Path.open

    def unreadable(self, *a, **kw):
        if self.suffix == ".doc_hashes":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *a, **kw)
    monkeypatch.setattr(Path, "open", unreadable)
    assert _document_hashes(train)[1] == (
        "computed: train.doc_hashes cannot be read (Permission denied)")
    assert _refusal(_cfg(tmp_path, train, valid)) == with_files
