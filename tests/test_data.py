"""Megatron indexed-dataset preparation and reading."""
import json
import threading
import time

import numpy as np
import pytest

from dist_train.cli import main
from dist_train.data.datasets import IndexedTokenDataset
from dist_train.data import prepare as prepare_module
from dist_train.data.prepare import ensure_prepared, prepare_indexed
from dist_train.data.tokenizer import ByteTokenizer


def test_prepare_and_read_back_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second doc"}) + "\n" + json.dumps({"text": "third"}) + "\n")
    info = prepare_indexed([tmp_path / "a.txt", tmp_path / "b.jsonl"], str(tmp_path / "ds"), "byte")
    assert info["documents"] == 3
    tok = ByteTokenizer()
    expected = []
    for text in ("hello world\n", "second doc", "third"):
        expected += tok.encode(text) + [tok.eod_id]
    assert info["tokens"] == len(expected)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mds = IndexedDataset(str(tmp_path / "ds"))  # Megatron itself reads what we wrote
    assert len(mds) == 3 and list(mds[1]) == tok.encode("second doc") + [tok.eod_id]
    ds = IndexedTokenDataset(str(tmp_path / "ds"), seq_len=4, seed=0)
    stream = np.asarray(expected)
    seen = set()
    for i in range(ds.num_chunks):
        chunk = ds[i].numpy()
        assert len(chunk) == 5
        start = next(s for s in range(0, len(stream) - 4, 4) if np.array_equal(stream[s:s + 5], chunk))
        seen.add(start)
    assert len(seen) == ds.num_chunks  # one epoch visits every chunk once


def test_a_failed_prepare_leaves_nothing_behind(tmp_path):
    """Missing inputs and directories are named before anything is written; a bad JSONL line met while
    writing removes the temporaries (they were left as PREFIX.bin.tmpPID)."""
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    out = tmp_path / "out"
    out.mkdir()
    for inputs, msg in (([tmp_path / "a.txt", tmp_path / "missing.txt"], "missing.txt: no such file"),
                        ([tmp_path], "is a directory; give its files"),
                        ([tmp_path / "a.txt", tmp_path / "bad.jsonl"], "bad.jsonl")):
        with pytest.raises(ValueError, match=msg):
            prepare_indexed(inputs, str(out / "ds"), "byte")
        assert list(out.iterdir()) == [], (msg, list(out.iterdir()))


def test_prepare_never_writes_over_a_dataset(tmp_path, capsys):
    """A dataset at --output may be what runs train on and resume from (their checkpoints record its digest):
    preparing other text there replaced it, and every such run was then refused at resume with its data gone.
    Like the converters' outputs, it is never written over: one line, exit 2, the files untouched."""
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.txt").write_text("other text\n")
    prefix = str(tmp_path / "ds")
    prepare_indexed([tmp_path / "a.txt"], prefix, "byte")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ds.")}
    assert sorted(before) == ["ds.bin", "ds.doc_hashes", "ds.idx", "ds.meta.json"]
    with pytest.raises(ValueError) as info:
        prepare_indexed([tmp_path / "b.txt"], prefix, "byte")
    assert "ds.bin and .idx already exist" in str(info.value) and "choose a new output prefix" in str(info.value)
    assert "\n" not in str(info.value)
    assert main(["data", "prepare", "--input", str(tmp_path / "b.txt"), "--output", prefix]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ds.")} == before


def test_an_interrupted_build_is_built_again(tmp_path):
    """A lone .bin (a build killed between its two renames, or a copy cut short) is no dataset: prepared again."""
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "ds.bin").write_bytes(b"partial")
    info = prepare_indexed([tmp_path / "a.txt"], str(tmp_path / "ds"), "byte")
    assert info["documents"] == 1 and IndexedTokenDataset(str(tmp_path / "ds"), seq_len=4, seed=0).num_chunks > 0


@pytest.mark.parametrize("record", [{"content": "the key of another tool"}, {"text": 12}, {"text": None}, ["text"]])
def test_a_jsonl_record_without_a_string_text_is_refused_not_skipped(tmp_path, record):
    """A JSONL line whose object had no string "text" (another key, a number, null) was skipped silently: the dataset
    lacked those documents and said nothing. Now refused naming the file and line, like Megatron's preprocessing;
    an empty text is still no document."""
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in ({"text": "kept"}, {"text": ""}, record)))
    with pytest.raises(ValueError, match=r"c.jsonl:3: not a JSON object with a 'text' field \(a string\)"):
        prepare_indexed([tmp_path / "c.jsonl"], str(tmp_path / "ds"), "byte")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in ({"text": "kept"}, {"text": ""})))
    assert prepare_indexed([tmp_path / "c.jsonl"], str(tmp_path / "ds"), "byte")["documents"] == 1


def test_a_jsonl_line_of_invalid_utf8_is_refused_not_replaced(tmp_path):
    """JSONL was read with errors="replace": a Latin-1 byte inside a "text" became U+FFFD, silently. Refused naming
    the file and line; valid UTF-8 (with CRLF line ends) reads as before."""
    good = json.dumps({"text": "café"}, ensure_ascii=False).encode()
    (tmp_path / "l.jsonl").write_bytes(good + b"\r\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"l.jsonl:2: not valid UTF-8 \(byte 13 of the line"):
        prepare_indexed([tmp_path / "l.jsonl"], str(tmp_path / "ds"), "byte")
    (tmp_path / "l.jsonl").write_bytes(good + b"\r\n" + good + b"\n")
    info = prepare_indexed([tmp_path / "l.jsonl"], str(tmp_path / "ds"), "byte")
    assert info["documents"] == 2 and info["tokens"] == 2 * (len("café".encode()) + 1)


def test_two_jobs_building_the_missing_corpus_at_once_build_it_once(tmp_path, monkeypatch):
    """Two rank 0s (two jobs started together on a fresh machine) both find data.prepare's dataset missing: one builds
    it, the other waits and uses it. Before, both built, and the one that checked after the other's rename stopped on
    'already exist' (seen in a fresh clone's full test run: test_launch_e2e's reference and faulty jobs)."""
    src = tmp_path / "corpus.py"
    src.write_text("print('hello')\n" * 50)
    monkeypatch.setattr(prepare_module, "python_stdlib_files", lambda: [src])
    real, builds = prepare_module.prepare_indexed, []

    def slow_build(*args, **kwargs):  # long enough that the second job starts while the first builds
        builds.append(threading.get_ident())
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare_indexed", slow_build)
    prefix, errors = str(tmp_path / "cache" / "pystd"), []

    def job():
        try:
            ensure_prepared(prefix, "python-stdlib")
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert not errors and len(builds) == 1, (errors, builds)
    assert IndexedTokenDataset(prefix, seq_len=8, seed=0).num_chunks > 0
