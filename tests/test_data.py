"""Megatron indexed-dataset preparation and reading."""
import json

import numpy as np

from dist_train.data.datasets import IndexedTokenDataset
from dist_train.data.prepare import prepare_indexed
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
