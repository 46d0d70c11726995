"""Tokenizer end-of-document handling, the dataset sidecar and byte-exact text reading in data prepare."""
import json

import numpy as np
import pytest

from dist_train.cli import main
from dist_train.data.sidecar import dataset_tokenizer, other_tokenizer_message, read_sidecar, sidecar_path
from dist_train.data.tokenizer import HFTokenizer, fingerprints_differ, tokenizer_fingerprint

tokenizers = pytest.importorskip("tokenizers")


def _word_tokenizer(path, extra=()):
    """A tiny word-level tokenizer.json: ids 0.. for 'a b c <unk>' plus ``extra`` tokens."""
    vocab = {w: i for i, w in enumerate(["<unk>", "a", "b", "c", *extra])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return vocab


def test_tokenizer_without_eos_refuses_in_one_line(tmp_path, capsys):
    _word_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "d.txt").write_text("a b c")
    rc = main(["data", "prepare", "--input", str(tmp_path / "d.txt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
               "--output", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--eod-token TOKEN" in err
    assert not (tmp_path / "ds.bin").exists() and not sidecar_path(tmp_path / "ds").exists()
    rc = main(["data", "prepare", "--input", str(tmp_path / "d.txt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
               "--eod-token", "<nope>", "--output", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "'<nope>'" in err


def test_eod_token_option_config_eos_and_sidecar(tmp_path, capsys):
    vocab = _word_tokenizer(tmp_path / "tokenizer.json", extra=["<sep>", "</s>", "pad"])
    (tmp_path / "d.txt").write_text("a b a c")
    rc = main(["data", "prepare", "--input", str(tmp_path / "d.txt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
               "--eod-token", "<sep>", "--output", str(tmp_path / "ds")])
    assert rc == 0, capsys.readouterr().err
    side = read_sidecar(tmp_path / "ds")
    assert side["vocab_size"] == 7 and side["eod_id"] == vocab["<sep>"] and side["max_token_id"] == vocab["<sep>"]
    assert side["tokenizer"] == str(tmp_path / "tokenizer.json") and side["documents"] == 1 and side["tokens"] == 5
    written = np.memmap(tmp_path / "ds.bin", dtype=np.uint16, mode="r")
    assert list(written) == [vocab[w] for w in "a b a c".split()] + [vocab["<sep>"]]
    # without the option: the recognised </s>; a tokenizer_config.json's eos_token wins over the usual names
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).eod_id == vocab["</s>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "pad"}}))
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).eod_id == vocab["pad"]


def test_prepare_keeps_carriage_returns(tmp_path, capsys):
    (tmp_path / "crlf.txt").write_bytes(b"line one\r\nline two\rend")
    assert main(["data", "prepare", "--input", str(tmp_path / "crlf.txt"), "--output", str(tmp_path / "ds")]) == 0
    written = bytes(np.memmap(tmp_path / "ds.bin", dtype=np.uint16, mode="r")[:-1].astype(np.uint8))
    assert written == b"line one\r\nline two\rend"
    side = read_sidecar(tmp_path / "ds")
    assert (side["tokenizer"], side["vocab_size"], side["eod_id"], side["max_token_id"]) == ("byte", 257, 256, 256)


def test_unreadable_sidecar_is_one_line(tmp_path):
    sidecar_path(tmp_path / "ds").write_text("{not json")
    with pytest.raises(ValueError, match="rebuild") as e:
        read_sidecar(tmp_path / "ds")
    assert "\n" not in str(e.value)
    assert read_sidecar(tmp_path / "missing") is None


def test_a_tokenizer_that_appends_its_eos_ends_each_document_with_one_eod(tmp_path, capsys):
    """A tokenizer.json whose post-processor adds BOS/EOS (Llama/T5-style templates): prepare appended the EOD id after
    the tokenizer's own EOS, so every document ended with two and an empty document sat between every pair (trained
    on as "after EOD comes EOD"). Now exactly one; the template's BOS stays."""
    vocab = _word_tokenizer(tmp_path / "tokenizer.json", extra=["<s>", "</s>"])
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "x.txt").write_text("a b c")
    (tmp_path / "y.txt").write_text("c b")
    rc = main(["data", "prepare", "--input", str(tmp_path / "x.txt"), str(tmp_path / "y.txt"), "--tokenizer",
               str(tmp_path / "tokenizer.json"), "--output", str(tmp_path / "ds")])
    assert rc == 0, capsys.readouterr().err
    bos, eos = vocab["<s>"], vocab["</s>"]
    written = list(np.memmap(tmp_path / "ds.bin", dtype=np.uint16, mode="r"))
    assert written == [bos, vocab["a"], vocab["b"], vocab["c"], eos, bos, vocab["c"], vocab["b"], eos]
    assert read_sidecar(tmp_path / "ds")["tokens"] == 9


def test_the_byte_tokenizer_keeps_every_byte_of_a_text_file(tmp_path, capsys):
    """Text files were decoded as UTF-8 with replacement before the byte tokenizer saw them: a Latin-1 'é' (0xE9)
    became the three bytes of U+FFFD, silently. The byte tokenizer now takes the file's bytes as they are; a
    tokenizer.json still reads UTF-8."""
    raw = b"caf\xe9 cr\xe8me\r\n\xff"
    (tmp_path / "latin1.txt").write_bytes(raw)
    assert main(["data", "prepare", "--input", str(tmp_path / "latin1.txt"), "--output", str(tmp_path / "ds")]) == 0
    written = np.memmap(tmp_path / "ds.bin", dtype=np.uint16, mode="r")
    assert list(written) == list(raw) + [256]
    vocab = _word_tokenizer(tmp_path / "tokenizer.json", extra=["</s>"])
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).encode(b"a b\xff c") == [vocab[w] for w in ("a", "b", "<unk>", "c")]


def ordered_word_tokenizer(path, words) -> str:
    """A word-level tokenizer.json with ids in the order of ``words`` (``<unk>`` first, ``</s>`` last, the EOD); returns
    its path (also tests/test_tokenizer_identity.py's)."""
    vocab = {w: i for i, w in enumerate(["<unk>", *words, "</s>"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_two_tokenizers_of_equal_size_and_eod_are_told_apart_by_their_fingerprint(tmp_path):
    """Two tokenizer.json files with the same vocabulary size and EOD id but other meanings for ids 1 and 2: the
    sidecars recorded only kind, size and EOD id, so a held-out set of the other one passed. Now each sidecar records
    its tokenizer's fingerprint and the pair is refused in one line naming both; the same file re-saved with other
    formatting keeps its fingerprint; an older sidecar without one is compared as before."""
    (tmp_path / "d.txt").write_text("a b c a")
    ab = ordered_word_tokenizer(tmp_path / "ab.json", ["a", "b", "c"])
    ba = ordered_word_tokenizer(tmp_path / "ba.json", ["b", "a", "c"])
    for name, tok in (("one", ab), ("two", ba)):
        assert main(["data", "prepare", "--input", str(tmp_path / "d.txt"), "--tokenizer", tok,
                     "--output", str(tmp_path / name)]) == 0
    one, two = read_sidecar(tmp_path / "one"), read_sidecar(tmp_path / "two")
    assert (one["vocab_size"], one["eod_id"]) == (two["vocab_size"], two["eod_id"]) == (5, 4)
    assert one["tokenizer_fingerprint"] == tokenizer_fingerprint(ab) != tokenizer_fingerprint(ba)
    assert one["tokenizer_fingerprint"].startswith("vocab-sha256:") and dataset_tokenizer(tmp_path / "two") == two[
        "tokenizer_fingerprint"]
    refusal = other_tokenizer_message(tmp_path / "one", tmp_path / "two", "data.path", "data.valid_path", (one, two))
    assert refusal and "\n" not in refusal and one["tokenizer_fingerprint"] in refusal
    assert two["tokenizer_fingerprint"] in refusal and "prepare both with the same --tokenizer" in refusal
    # formatting does not count: the same definition re-saved indented with other key order
    (tmp_path / "ab2.json").write_text(json.dumps(dict(reversed(json.loads((tmp_path / "ab.json").read_text()).items())),
                                                  indent=3))
    assert tokenizer_fingerprint(tmp_path / "ab2.json") == tokenizer_fingerprint(ab)
    assert main(["data", "prepare", "--input", str(tmp_path / "d.txt"), "--output", str(tmp_path / "bytes")]) == 0
    assert dataset_tokenizer(tmp_path / "bytes") == "byte"
    older = {k: v for k, v in read_sidecar(tmp_path / "bytes").items() if k != "tokenizer_fingerprint"}
    sidecar_path(tmp_path / "bytes").write_text(json.dumps(older))  # before fingerprints: byte is still byte
    assert dataset_tokenizer(tmp_path / "bytes") == "byte"
    # a sidecar from before fingerprints: unknown, not compared (kind, size and EOD id still are)
    del two["tokenizer_fingerprint"]
    sidecar_path(tmp_path / "two").write_text(json.dumps(two))
    assert dataset_tokenizer(tmp_path / "two") is None
    assert other_tokenizer_message(tmp_path / "one", tmp_path / "two", "data.path", "data.valid_path",
                                   (one, read_sidecar(tmp_path / "two"))) is None


def test_the_same_tokenizer_in_another_tokenizers_versions_format_keeps_its_fingerprint(tmp_path):
    """A hub tokenizer.json written by an older `tokenizers` (BPE merges as "a b" strings, no ignore_merges) and the
    same tokenizer re-saved by the installed one (merges as pairs, fields added) encode alike: their fingerprints were
    the digests of the two files' JSON, so an HF import and data prepared with the re-saved file were refused as two
    tokenizers. The fingerprint is the id -> token table's; ids naming other tokens still differ, and a first-version
    whole-file fingerprint is not compared with it (``byte`` always is)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "</s>": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "new.json"))
    body = json.loads((tmp_path / "new.json").read_text())
    body["model"]["merges"] = ["a b"]
    body["model"].pop("ignore_merges")
    (tmp_path / "old.json").write_text(json.dumps(body))
    old = tokenizers.Tokenizer.from_file(str(tmp_path / "old.json"))
    assert old.encode("ab a b").ids == tok.encode("ab a b").ids == [3, 1, 2]
    assert tokenizer_fingerprint(tmp_path / "old.json") == tokenizer_fingerprint(tmp_path / "new.json")
    assert tokenizer_fingerprint(tmp_path / "new.json").startswith("vocab-sha256:")
    body["model"]["vocab"] = {"<unk>": 0, "b": 1, "a": 2, "ab": 3, "</s>": 4}
    (tmp_path / "swapped.json").write_text(json.dumps(body))
    assert tokenizer_fingerprint(tmp_path / "swapped.json") != tokenizer_fingerprint(tmp_path / "old.json")
    mine = tokenizer_fingerprint(tmp_path / "old.json")
    assert fingerprints_differ(mine, tokenizer_fingerprint(tmp_path / "swapped.json"))
    assert not fingerprints_differ(mine, mine) and not fingerprints_differ(mine, None)
    assert not fingerprints_differ(mine, "sha256:0123456789abcdef")  # the first version's kind: not comparable
    assert fingerprints_differ(mine, "byte") and fingerprints_differ("sha256:0123456789abcdef", "byte")
