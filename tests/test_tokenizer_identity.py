"""Which tokenizer the ids mean, across checkpoints: a run records its data's tokenizer fingerprint
(``train_tokenizer``), an HF import the fingerprint of the tokenizer.json beside its weights; a resume or fine-tune on
data prepared with another tokenizer (same vocabulary size and EOD id: nothing else could tell) is refused in one
line unless ``checkpoint.allow_config_change: [data.tokenizer]``; an HF export names and copies the model's tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dist_train.checkpoint import hf
from dist_train.checkpoint.cli import convert
from dist_train.checkpoint.compat import ResumeMismatchError, check_tokenizer
from dist_train.checkpoint.manager import checkpoint_extra
from dist_train.config import ConfigError, ModelConfig
from dist_train.data.prepare import prepare_indexed
from dist_train.data.tokenizer import sentencepiece_fingerprint, tokenizer_fingerprint
from dist_train.models.gpt import GPT
from dist_train.preflight import preflight
from dist_train.trainer import train
from tests.test_data_tokenizer import ordered_word_tokenizer
from tests.trainer_utils import tiny_gpt_config

tokenizers = pytest.importorskip("tokenizers")

MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two tokenizers of equal size and EOD id that swap the meaning of ids 1 and 2, the same text prepared with
    each: ``{"ab": (tokenizer, dataset), "ba": (...)}``."""
    root = tmp_path_factory.mktemp("tok")
    (root / "text.txt").write_text("a b c a c b " * 60)
    out = {}
    for name, words in (("ab", ["a", "b", "c"]), ("ba", ["b", "a", "c"])):
        tok = ordered_word_tokenizer(root / f"{name}.json", words)
        out[name] = (tok, prepare_indexed([root / "text.txt"], str(root / name), tok)["prefix"])
    return out


def _config(run: Path, data: str, steps: int = 1, **checkpoint):
    """A tiny GPT on the prepared dataset ``data``; data.tokenizer left as configured before (it only builds data
    that is missing), as when both datasets were prepared with ``dist-train data prepare``: the config cannot tell."""
    return tiny_gpt_config(run, steps=steps, model=MODEL, data={"source": "indexed", "path": data, "seq_len": 16},
                           checkpoint={"at_end": True, **checkpoint})


def test_check_tokenizer_compares_only_known_fingerprints_and_allows_data_tokenizer():
    extra = {"train_tokenizer": "sha256:aaaa", "consumed_samples": 0}
    with pytest.raises(ResumeMismatchError) as info:
        check_tokenizer(Path("ck/step_0"), extra, "sha256:bbbb", [], "d/ds")
    msg = str(info.value)
    assert "\n" not in msg and "tokenizer sha256:aaaa" in msg and "tokenizer sha256:bbbb" in msg
    assert "allow_config_change: [data.tokenizer]" in msg
    check_tokenizer(Path("ck"), extra, "sha256:bbbb", ["data.tokenizer"], "d/ds")  # allowed deliberately
    check_tokenizer(Path("ck"), extra, "sha256:aaaa", [], "d/ds")  # the same tokenizer
    check_tokenizer(Path("ck"), extra, None, [], "d/ds")  # data of unknown tokenizer (no sidecar, or an old one)
    check_tokenizer(Path("ck"), {"consumed_samples": 4}, "sha256:bbbb", [], "d/ds")  # an old checkpoint


def test_a_fine_tune_onto_data_of_another_tokenizer_is_refused_even_with_data_path_allowed(tmp_path, prepared):
    """The run records its data's tokenizer; a fine-tune onto new data (data.path allowed to change) prepared with
    another tokenizer.json of the same size was accepted: the model read every id as another token. Refused by the
    pre-flight and by the ranks' checkpoint manager; allowed with data.tokenizer; the same tokenizer goes on."""
    (ab_tok, ab), (ba_tok, ba) = prepared["ab"], prepared["ba"]
    run = tmp_path / "run"
    train(_config(run, ab))
    extra = checkpoint_extra(run / "checkpoints" / "step_1")
    assert extra["train_tokenizer"] == tokenizer_fingerprint(ab_tok)
    other = _config(run, ba, steps=2, allow_config_change=["data.path"])
    refusal = rf"step_1 holds a model of tokenizer {extra['train_tokenizer']}, but data.path .*ba was prepared with"
    with pytest.raises(ConfigError, match=refusal):
        preflight(other, on_cuda=False)
    with pytest.raises(ResumeMismatchError, match=refusal):
        train(other)
    allowed = _config(run, ba, steps=2, allow_config_change=["data.path", "data.tokenizer"])
    preflight(allowed, on_cuda=False)
    assert train(allowed).start_step == 1
    # the fine-tuned model's ids now mean the new tokenizer's tokens: its checkpoint says so
    extra = checkpoint_extra(run / "checkpoints" / "step_2")
    assert extra["train_tokenizer"] == tokenizer_fingerprint(ba_tok)


def _hf_dir(tmp_path: Path) -> Path:
    """A tiny Llama directory (model.safetensors + config.json) written by the exporter from random weights."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MODEL))
    step0 = hf.write_step0(tmp_path / "made", {k: v.detach() for k, v in model.state_dict().items()},
                           {"model": {"kind": "gpt", **MODEL}})
    return hf.to_hf(step0, tmp_path / "hf").directory


def test_an_hf_import_records_its_tokenizer_and_a_fine_tune_on_other_token_ids_is_refused(tmp_path, prepared):
    """A tokenizer.json beside the imported weights gives the ids their meaning: the step-0 checkpoint records its
    fingerprint, so a fine-tune on data prepared with another tokenizer of the same size is refused before any rank
    starts; data of the model's tokenizer passes. An import without a tokenizer.json records none (not compared)."""
    (ab_tok, ab), (ba_tok, ba) = prepared["ab"], prepared["ba"]
    src = _hf_dir(tmp_path)
    bare = hf.from_hf(src, tmp_path / "bare")
    assert "train_tokenizer" not in checkpoint_extra(bare)
    (src / "tokenizer.json").write_bytes(Path(ab_tok).read_bytes())
    init = hf.from_hf(src, tmp_path / "init")
    assert checkpoint_extra(init)["train_tokenizer"] == tokenizer_fingerprint(ab_tok)
    with pytest.raises(ConfigError, match=r"step_0 holds a model of tokenizer [\w-]+:\w+, but data.path .*ba was "):
        preflight(_config(tmp_path / "ft", ba, resume=str(tmp_path / "init")), on_cuda=False)
    preflight(_config(tmp_path / "ft", ab, resume=str(tmp_path / "init")), on_cuda=False)
    preflight(_config(tmp_path / "ft", ba, resume=str(tmp_path / "bare")), on_cuda=False)


def test_an_hf_export_names_and_copies_the_models_tokenizer(tmp_path, prepared, capsys):
    """The export's safetensors metadata names the tokenizer fingerprint; the tokenizer.json of the training data's
    sidecar is copied beside the weights; an output directory already holding another tokenizer.json is refused."""
    ab_tok, ab = prepared["ab"]
    run = tmp_path / "run"
    train(_config(run, ab))
    step = run / "checkpoints" / "step_1"
    export = hf.to_hf(step, tmp_path / "out")
    out = export.directory
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["tokenizer"] == export.tokenizer == tokenizer_fingerprint(ab_tok)
    assert (out / "tokenizer.json").read_bytes() == Path(ab_tok).read_bytes()
    assert hf.missing_tokenizer_note(export) is None
    # the tokenizer.json the data was prepared with moved away: nothing to copy, and the export says so
    moved = Path(ab_tok).rename(tmp_path / "moved.json")
    try:
        assert convert(step, tmp_path / "bare", "hf", None) == 0
        assert not (tmp_path / "bare" / "tokenizer.json").exists()
        note = capsys.readouterr().err.strip()
        assert note == hf.missing_tokenizer_note(hf.HFExport(tmp_path / "bare", export.tokenizer))
        assert "\n" not in note and tokenizer_fingerprint(moved) in note and "copy that tokenizer.json" in note
    finally:
        moved.rename(ab_tok)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "tokenizer.json").write_bytes(Path(prepared["ba"][0]).read_bytes())
    with pytest.raises(ValueError, match=r"taken/tokenizer.json: tokenizer [\w-]+:\w+, but checkpoint .*step_1 holds a "
                                         r"model of tokenizer [\w-]+:\w+: its ids would be read as other tokens"):
        hf.to_hf(step, tmp_path / "taken")
    assert not (tmp_path / "taken" / "model.safetensors").exists()


def test_a_resume_naming_the_same_tokenizer_by_another_path_goes_on(tmp_path, prepared):
    """data.tokenizer is compared by the tokenizer it names, not by its path: the same tokenizer.json moved (or named
    at last, over a leftover ``byte`` that only builds missing data) with the same prepared data is no change. The
    path was compared as text and refused such a resume with allow_config_change: [data.tokenizer] as the only way on."""
    ab_tok, ab = prepared["ab"]
    run = tmp_path / "run"
    cfg = _config(run, ab)
    cfg.data.tokenizer = ab_tok
    train(cfg)
    moved = tmp_path / "moved" / "tokenizer.json"
    moved.parent.mkdir()
    moved.write_bytes(Path(ab_tok).read_bytes())
    for named in (str(moved), "byte"):
        again = _config(run, ab, steps=2)
        again.data.tokenizer = named
        preflight(again, on_cuda=False)
    assert train(again).start_step == 1
    # another tokenizer at the path is still refused, by what it is
    again = _config(run, prepared["ba"][1], steps=2, allow_config_change=["data.path"])
    again.data.tokenizer = prepared["ba"][0]
    with pytest.raises(ConfigError, match=r"holds a model of tokenizer [\w-]+:\w+, but data.path"):
        preflight(again, on_cuda=False)


def test_data_tokenizer_naming_another_tokenizer_than_the_datasets_sidecar_is_refused(tmp_path, prepared):
    """data.tokenizer names a tokenizer.json whose id -> token table is not the one the dataset's sidecar records:
    the model would be configured for one tokenizer and fed the ids of another. Refused before any rank starts, naming
    both, unless allowed like any tokenizer change; the same tokenizer at another path, the default ``byte`` (it only
    builds missing data), and a dataset whose sidecar records no tokenizer pass."""
    (ab_tok, ab), (ba_tok, ba) = prepared["ab"], prepared["ba"]
    cfg = _config(tmp_path / "run", ab)
    cfg.data.tokenizer = ba_tok
    with pytest.raises(ConfigError) as info:
        preflight(cfg, on_cuda=False)
    line = str(info.value)
    assert "\n" not in line and f"data.tokenizer = {ba_tok}" in line and tokenizer_fingerprint(ba_tok) in line, line
    assert tokenizer_fingerprint(ab_tok) in line and f"data.path = {ab}" in line, line
    assert "allow_config_change: [data.tokenizer]" in line, line
    preflight(_config(tmp_path / "run", ab, allow_config_change=["data.tokenizer"]), on_cuda=False)

    same = tmp_path / "same" / "tokenizer.json"
    same.parent.mkdir()
    same.write_bytes(Path(ab_tok).read_bytes())
    for named in (str(same), "byte"):
        cfg.data.tokenizer = named
        preflight(cfg, on_cuda=False)

    # byte-level data against a tokenizer.json: refused the same way
    (tmp_path / "t.txt").write_text("a b c " * 40)
    byte_data = prepare_indexed([tmp_path / "t.txt"], str(tmp_path / "bytes"), "byte")["prefix"]
    cfg = _config(tmp_path / "run2", byte_data)
    cfg.model.vocab_size = 257
    cfg.data.tokenizer = ab_tok
    with pytest.raises(ConfigError, match=r"data.tokenizer = .*ab.json \(tokenizer vocab-sha256:\w+\).* byte"):
        preflight(cfg, on_cuda=False)

    # a dataset built elsewhere (no sidecar) records nothing to compare with
    for suffix in (".bin", ".idx"):
        (tmp_path / f"elsewhere{suffix}").write_bytes(Path(f"{ab}{suffix}").read_bytes())
    cfg = _config(tmp_path / "run3", str(tmp_path / "elsewhere"))
    cfg.data.tokenizer = ba_tok
    preflight(cfg, on_cuda=False)


def test_an_hf_export_copies_the_tokenizers_special_token_files(tmp_path):
    """The training tokenizer came from an HF directory: its tokenizer_config.json and special_tokens_map.json (which
    name bos/eos/pad/unk) are copied beside tokenizer.json, so AutoTokenizer on the export has the same special tokens
    (tokenizer.json alone gives none); a different one already in the output directory is refused, never replaced."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "hf_tok"
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "a", "b", "c"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(src))
    (src / "special_tokens_map.json").write_text(json.dumps(special))  # what transformers < 5 also wrote
    (tmp_path / "t.txt").write_text("a b c </s> " * 40)
    data = prepare_indexed([tmp_path / "t.txt"], str(tmp_path / "ds"), str(src / "tokenizer.json"))["prefix"]
    model = {**MODEL, "vocab_size": 8}
    torch.manual_seed(0)
    weights = {k: v.detach() for k, v in GPT(ModelConfig(**model)).state_dict().items()}
    step = hf.write_step0(tmp_path / "ck", weights, {"model": {"kind": "gpt", **model}, "data": {"path": data}},
                          {"train_tokenizer": tokenizer_fingerprint(src / "tokenizer.json")})

    out = hf.to_hf(step, tmp_path / "out").directory
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    want = transformers.AutoTokenizer.from_pretrained(str(src))
    got = transformers.AutoTokenizer.from_pretrained(str(out))
    assert got.special_tokens_map == want.special_tokens_map and got.special_tokens_map["eos_token"] == "</s>"
    assert got.eos_token_id == want.eos_token_id == 2 and got("a b").input_ids == want("a b").input_ids

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"taken/tokenizer_config.json: differs from .*hf_tok/tokenizer_config.json"):
        hf.to_hf(step, tmp_path / "taken")
    assert (tmp_path / "taken" / "tokenizer_config.json").read_text() == "{}"
    assert not (tmp_path / "taken" / "model.safetensors").exists()


def _sentencepiece_model(path: Path, pieces: list[str], model_type: int = 2) -> Path:
    """A sentencepiece ``tokenizer.model`` (ModelProto) serialised by protobuf with transformers' schema, not by our
    code; ``pieces`` in id order, scores and trainer settings varied by ``model_type``."""
    pb = pytest.importorskip("transformers.utils.sentencepiece_model_pb2_new")
    m = pb.ModelProto()
    for i, piece in enumerate(pieces):
        entry = m.pieces.add()
        entry.piece, entry.score, entry.type = piece, -float(i) * model_type, 2 if piece == "<unk>" else 1
    m.trainer_spec.model_type = model_type
    m.trainer_spec.vocab_size = len(pieces)
    m.normalizer_spec.name = "nmt_nfkc"
    path.write_bytes(m.SerializeToString())
    return path


def test_a_sentencepiece_only_hf_import_records_its_tokenizer(tmp_path):
    """An HF directory with tokenizer.model (sentencepiece) and no tokenizer.json (Llama 2 style) recorded no
    tokenizer: the import now records ``spm-sha256:`` of its id -> piece table (not of the file's bytes: scores and
    trainer settings do not change what an id means), so a fine-tune on byte-level data is refused; a tokenizer.json
    beside it is the fingerprint (it is what data prepare reads); a tokenizer.model that is not sentencepiece (Llama 3's
    tiktoken text) records nothing."""
    pieces = ["<unk>", "<s>", "</s>", "\u2581a", "b", "<0x0A>"]
    src = _hf_dir(tmp_path)
    _sentencepiece_model(src / "tokenizer.model", pieces)
    step = hf.from_hf(src, tmp_path / "spm")
    recorded = checkpoint_extra(step)["train_tokenizer"]
    assert recorded.startswith("spm-sha256:"), recorded
    other = tmp_path / "other"
    other.mkdir()
    assert sentencepiece_fingerprint(_sentencepiece_model(other / "same.model", pieces, model_type=1)) == recorded
    swapped = [pieces[0], pieces[2], pieces[1], *pieces[3:]]
    assert sentencepiece_fingerprint(_sentencepiece_model(other / "swapped.model", swapped)) != recorded
    with pytest.raises(ResumeMismatchError, match=rf"holds a model of tokenizer {recorded}, but data.path d was "
                                                   r"prepared with tokenizer byte"):
        check_tokenizer(step, {"train_tokenizer": recorded}, "byte", [], "d")
    check_tokenizer(step, {"train_tokenizer": recorded}, "vocab-sha256:0123456789abcdef", [], "d")  # not comparable
    export = hf.to_hf(step, tmp_path / "exported")  # the export names it and says which file to copy
    with safe_open(str(export.directory / "model.safetensors"), "pt") as f:
        assert f.metadata()["tokenizer"] == export.tokenizer == recorded
    note = hf.missing_tokenizer_note(export)
    assert "\n" not in note and recorded in note and "tokenizer.model" in note, note

    (other / "tiktoken.model").write_bytes(b"IQ== 0\nIg== 1\nIw== 2\nJA== 3\n")
    assert sentencepiece_fingerprint(other / "tiktoken.model") is None
    (src / "tokenizer.model").write_bytes((other / "tiktoken.model").read_bytes())
    bare = hf.from_hf(src, tmp_path / "tiktoken")
    assert "train_tokenizer" not in checkpoint_extra(bare)
    ordered_word_tokenizer(src / "tokenizer.json", ["a", "b", "c"])
    both = hf.from_hf(src, tmp_path / "both")
    assert checkpoint_extra(both)["train_tokenizer"] == tokenizer_fingerprint(src / "tokenizer.json")
