"""The data path's contracts (no processes, tiny data): held-out data stays held out, the sample order across dp
ranks, accumulation and epochs, cp shards of packed documents."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_train.checkpoint.manager import saved_extra
from dist_train.config import ConfigError
from dist_train.data.batches import TokenBatcher
from dist_train.data.datasets import IndexedTokenDataset
from dist_train.data.documents import DocumentOptions, document_options
from dist_train.data.image_batches import NORMALISATION_KEY, WeatherBatcher, same_normalisation_data
from dist_train.data.prepare import prepare_indexed
from dist_train.data.sidecar import sidecar_path
from dist_train.data.weather import prepare_weather
from dist_train.evaluation import Evaluator
from dist_train.models.gpt import IGNORE_INDEX
from dist_train.preflight import check_data
from dist_train.trainer import train
from parallelism import sequence_positions
from tests.trainer_utils import tiny_gpt_config, tiny_swin_config

ONE_RANK = SimpleNamespace(rank=0, size=lambda axis: 1, coord=lambda axis: 0)
WHOLE_IMAGE = SimpleNamespace(tile_slices=lambda size: (slice(0, size[0]), slice(0, size[1])))


def test_weather_normalisation_comes_from_the_training_share_only(tmp_path):
    """The per-channel mean and increment scale came from every time step, the validation share's included: the
    held-out fields shaped every training input. Now from the steps the training samples read (inputs and targets),
    and the validation batcher normalises with those same numbers."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "w", data={"split": "50,50,0"})
    prepare_weather(tmp_path / "w", height=10, width=16, steps=12, channels=2, seed=cfg.run.seed)
    fields = np.load(tmp_path / "w" / "fields.npy", mmap_mode="r+")  # 11 pairs: training 0..5 read steps 0..6
    fields[7:] = 1000.0 + 50.0 * np.arange(5, dtype=np.float32)[:, None, None, None]  # held-out steps far off
    fields.flush()
    train = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    valid = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "valid")
    sub = np.asarray(fields[:7, ::4, ::4], dtype=np.float64)
    want_mean = sub.reshape(-1, 2).mean(axis=0)
    want_scale = np.diff(sub, axis=0).reshape(-1, 2).std(axis=0)
    assert torch.allclose(train.mean.double(), torch.from_numpy(want_mean), rtol=1e-6)
    assert torch.allclose(train.scale.double(), torch.from_numpy(want_scale), rtol=1e-6)
    assert torch.equal(valid.mean, train.mean) and torch.equal(valid.scale, train.scale)
    assert (train.first, train.num_samples, valid.first, valid.num_samples) == (0, 6, 6, 5)


def test_a_validation_batcher_given_the_training_one_reads_no_statistics_of_its_own(tmp_path, monkeypatch):
    """Every rank's validation batcher read the training share's fields for statistics the trainer then replaced
    with the training batcher's (a resume's included): it takes those directly."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "w", data={"split": "50,50,0"})
    prepare_weather(tmp_path / "w", height=10, width=16, steps=12, channels=2, seed=cfg.run.seed)
    train = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    monkeypatch.setattr(WeatherBatcher, "_field_stats", lambda *a, **k: pytest.fail("statistics read again"))
    valid = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "valid", normalise_as=train)
    assert valid.mean is train.mean and valid.scale is train.scale


def test_a_resume_on_the_same_data_normalises_as_its_checkpoint_was_trained(tmp_path):
    """The statistics changed rule (every step -> the training share): a run resumed from a checkpoint of the older
    rule would have gone on with other inputs. A checkpoint records them; a resume on the same data goes on with the
    recorded ones, one written before they were recorded with every step's (that version's rule); a resume on
    other data (an allowed data change) with the recorded ones too, or its own when none are recorded."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "w", data={"split": "50,50,0"})
    prepare_weather(tmp_path / "w", height=10, width=16, steps=12, channels=2, seed=cfg.run.seed)
    fields = np.load(tmp_path / "w" / "fields.npy", mmap_mode="r+")
    fields[7:] += 100.0  # the held-out steps shift every-step statistics
    fields.flush()
    own = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    every_step = np.asarray(fields[:, ::4, ::4], dtype=np.float64).reshape(-1, 2).mean(axis=0)

    older = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    line = older.resume_normalisation(None, same_data=True)
    assert "over every time step" in line
    assert torch.allclose(older.mean.double(), torch.from_numpy(every_step), rtol=1e-6)
    assert not torch.allclose(older.mean, own.mean)
    valid = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "valid")
    valid.share_normalisation(older)
    assert torch.equal(valid.mean, older.mean) and torch.equal(valid.scale, older.scale)

    recorded = json.loads(json.dumps(older.normalisation()))  # through the checkpoint's JSON: exact
    again = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    assert "as the checkpoint records" in again.resume_normalisation(recorded, same_data=True)
    assert torch.equal(again.mean, older.mean) and torch.equal(again.scale, older.scale)

    assert own.resume_normalisation(own.normalisation(), same_data=True) is None  # nothing differs: nothing said
    # an allowed data change (a longer training share, a fine-tune onto other fields) keeps the model's recorded
    # statistics too: it took this data's own, silently re-scaling the model's inputs
    other = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    assert "the data changed since" in other.resume_normalisation(recorded, same_data=False)
    assert torch.equal(other.mean, older.mean) and torch.equal(other.scale, older.scale)
    # nothing recorded (an import, an older checkpoint) on other data: its own statistics, said in one line with
    # their values (it was silent), and nothing re-scaled that was set before
    said = other.resume_normalisation(None, same_data=False)
    assert "records no input_normalisation" in said and "this data's own" in said and "\n" not in said
    assert torch.equal(other.mean, older.mean)
    fresh = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    said = fresh.resume_normalisation(None, same_data=False)
    assert f"mean [{fresh.mean[0].item():.6g}, {fresh.mean[1].item():.6g}]" in said and torch.equal(fresh.mean, own.mean)
    with pytest.raises(ValueError, match="channels"):
        other.resume_normalisation({"mean": [0.0], "scale": [1.0]}, same_data=True)


def test_a_swin_checkpoint_records_its_normalisation_and_a_resume_goes_on_exactly(tmp_path):
    """train() writes the statistics into the checkpoint's extra state, and a resume over a data.split (recorded =
    this data's own) continues bitwise: 2 steps + restart + 1 step == 3 steps."""
    def cfg(run, **train_keys):
        return tiny_swin_config(tmp_path / run, tmp_path / "w", steps=3, data={"split": "50,50,0"},
                                checkpoint={"every": 1}, train=train_keys)
    straight = train(cfg("straight"))
    first = train(cfg("r", exit_interval=2))
    second = train(cfg("r"))
    assert second.start_step == 2 and first.losses + second.losses == straight.losses
    state = json.loads((tmp_path / "r" / "checkpoints" / "step_2" / "train_state.json").read_text())
    assert saved_extra(state)[NORMALISATION_KEY] == WeatherBatcher(cfg("r"), ONE_RANK, WHOLE_IMAGE).normalisation()


def test_the_normalisation_data_keys_decide_same_data():
    base = {"data": {"path": "w", "image": [8, 8], "channels": 2, "steps": 12, "split": "50,50,0"},
            "run": {"seed": 0}}
    assert same_normalisation_data(base, json.loads(json.dumps(base)))
    for section, key, value in [("data", "split", "90,10,0"), ("data", "path", "v"), ("run", "seed", 1)]:
        changed = json.loads(json.dumps(base))
        changed[section][key] = value
        assert not same_normalisation_data(base, changed)


def _byte_dataset(tmp_path_factory, name: str, texts: tuple[str, ...]) -> str:
    """A byte-tokenized dataset of two documents, each text repeated 40 times; returns its prefix."""
    d = tmp_path_factory.mktemp(name)
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": t * 40}) for t in texts))
    prepare_indexed([d / "docs.jsonl"], str(d / "ds"))
    return str(d / "ds")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """682 tokens: 42 samples of 16 tokens."""
    return _byte_dataset(tmp_path_factory, "corpus", ("alpha ", "beta gamma "))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    """Another text: 562 tokens, 35 samples of 16 tokens."""
    return _byte_dataset(tmp_path_factory, "held_out", ("omega ", "psi chi "))


def _gpt(tmp_path, prefix, data, **train):
    return tiny_gpt_config(tmp_path / "run", data={"source": "indexed", "path": prefix, "seq_len": 16, **data},
                           model={"vocab_size": 257}, train={"eval_every": 2, **train})


def test_an_evaluation_longer_than_the_held_out_data_is_refused(tmp_path, corpus, held_out):
    """eval_steps x global_batch beyond the held-out samples wrapped into the next epoch's order: the validation
    loss silently counted some samples twice (and the same ones every evaluation). Refused before any rank starts
    (split share, data.valid_path, weather share) and by the ranks' Evaluator; an evaluation that fits runs."""
    assert IndexedTokenDataset(corpus, 16, 7, "80,20,0", "valid").num_chunks == 8
    check_data(_gpt(tmp_path, corpus, {"split": "80,20,0"}, eval_steps=2, global_batch=4))  # 8 of 8
    with pytest.raises(ConfigError, match=r"^train.eval_steps = 3 x train.global_batch = 4 reads 12 held-out samples "
                                          r"per evaluation, but the validation share of data.split = '80,20,0' holds 8: "
                                          r"4 would be read again \(a sample counted twice or more\); "
                                          r"set train.eval_steps <= 2$"):
        check_data(_gpt(tmp_path, corpus, {"split": "80,20,0"}, eval_steps=3, global_batch=4))
    with pytest.raises(ConfigError, match=r"held_out.*/ds holds 35: 13 would be .* set a smaller train.global_batch$"):
        check_data(_gpt(tmp_path, corpus, {"valid_path": held_out}, eval_steps=1, global_batch=48, micro_batch=4))
    swin = tiny_swin_config(tmp_path / "s", tmp_path / "w", data={"split": "80,20,0"}, train={"eval_every": 2})
    with pytest.raises(ConfigError, match=r"holds 2: 6 would be read again .*; set train.eval_steps <= 1$"):
        check_data(swin)
    cfg = _gpt(tmp_path, corpus, {"split": "80,20,0"}, eval_steps=3, global_batch=4)
    valid = TokenBatcher(IndexedTokenDataset(corpus, 16, 7, "80,20,0", "valid"), micro_batch=2, dp=1, dp_rank=0)
    with pytest.raises(ValueError, match="holds 8: 4 would be read again"):
        Evaluator(cfg, ONE_RANK, valid)
    Evaluator(_gpt(tmp_path, corpus, {"split": "80,20,0"}, eval_steps=2, global_batch=4), ONE_RANK, valid)


def test_a_held_out_dataset_of_another_tokenizer_is_refused(tmp_path, corpus, held_out):
    """data.valid_path prepared with another tokenizer than data.path: the same id means another token in each, and
    the validation loss measured the model on text it never saw tokenized that way, silently. Refused before any
    rank starts, as the two sidecars say; the same tokenizer (or a dataset built elsewhere, no sidecar) passes."""
    held = tmp_path / "held"
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{held_out}{suffix}", f"{held}{suffix}")
    meta = json.loads(sidecar_path(held).read_text())
    check_data(_gpt(tmp_path, corpus, {"valid_path": str(held)}, eval_steps=1, global_batch=4))
    sidecar_path(held).write_text(json.dumps({**meta, "tokenizer": "other/tokenizer.json", "vocab_size": 300,
                                              "eod_id": 299}))
    with pytest.raises(ConfigError, match=r"^data.valid_path = .*held was prepared with tokenizer other/tokenizer.json "
                                          r"\(vocabulary 300, EOD id 299\) but data.path = .*ds with tokenizer byte "
                                          r"\(vocabulary 257, EOD id 256\): its token ids would mean other tokens"):
        check_data(_gpt(tmp_path, corpus, {"valid_path": str(held)}, eval_steps=1, global_batch=4))
    sidecar_path(held).unlink()
    check_data(_gpt(tmp_path, corpus, {"valid_path": str(held)}, eval_steps=1, global_batch=4))


def test_each_epoch_visits_every_sample_once_whatever_dp_and_accumulation(tmp_path):
    """The training order over three epochs of an indexed dataset (42 samples: the global batch of 6 does not divide
    it, so batches straddle epoch boundaries): for dp 1, 2, 3 (odd) with 1 or 2 accumulation micro-batches, the
    ranks' micro-batches of a step are exactly the step's global samples, every epoch visits each sample once, the
    epochs' orders differ, and a fresh dataset object (a resume) reads the same samples at the same indices."""
    letters = np.random.default_rng(0).integers(97, 123, 681).astype(np.uint8).tobytes().decode()
    (tmp_path / "a.txt").write_text(letters)
    corpus = str(tmp_path / "ds")
    prepare_indexed([tmp_path / "a.txt"], corpus)
    ds = IndexedTokenDataset(corpus, 16, 7)
    n, gb = ds.num_chunks, 6
    stream = np.memmap(f"{corpus}.bin", dtype=np.uint16, mode="r")
    starts = {tuple(stream[k * 16:k * 16 + 17]): k for k in range(n)}
    assert len(starts) == n  # distinct samples, so each one read is identified by its start
    orders = {}
    for dp, mb in ((1, 6), (1, 3), (2, 3), (2, 1), (3, 2), (3, 1)):
        ids = []
        for step in range(3 * n // gb):
            got = sorted(i for d in range(dp) for m in range(gb // (mb * dp))
                         for i in TokenBatcher(ds, micro_batch=mb, dp=dp, dp_rank=d).sample_ids(step * gb, m))
            assert got == list(range(step * gb, (step + 1) * gb)), (dp, mb, step)
            ids += got
        orders[(dp, mb)] = [starts[tuple(ds[i].tolist())] for i in ids]
    first = next(iter(orders.values()))
    assert all(order == first for order in orders.values())
    epochs = [first[e * n:(e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1] != epochs[2]
    resumed = IndexedTokenDataset(corpus, 16, 7)
    assert all(torch.equal(resumed[i], ds[i]) for i in range(n - 3, n + 3))


def test_no_validation_label_is_a_training_token(corpus):
    """data.split cuts the samples of one token stream: the shares touch in exactly one token, the last training
    label and the first validation input; every validation label lies beyond every training token."""
    train, valid = (IndexedTokenDataset(corpus, 16, 7, "80,20,0", part) for part in ("train", "valid"))
    trained = {(train.first + k) * 16 + o for k in range(train.num_chunks) for o in range(17)}
    valid_inputs = {(valid.first + k) * 16 + o for k in range(valid.num_chunks) for o in range(16)}
    valid_labels = {(valid.first + k) * 16 + o for k in range(valid.num_chunks) for o in range(1, 17)}
    assert trained & valid_inputs == {valid.first * 16} and not trained & valid_labels
    # the samples read are those positions: the first validation sample starts where the training share ends
    stream = np.memmap(f"{corpus}.bin", dtype=np.uint16, mode="r")
    read = sorted(tuple(valid[i].tolist()) for i in range(valid.num_chunks))
    assert read == sorted(tuple(int(t) for t in stream[(valid.first + k) * 16:(valid.first + k) * 16 + 17])
                          for k in range(valid.num_chunks))


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("cp", [2, 3])
def test_cp_shards_of_packed_documents_reassemble_the_cp1_batch(layout, cp):
    """Every cp rank's tokens, labels, document positions and loss mask are its layout's slice of the cp = 1 batch
    (documents cut at EODs, samples starting or ending with an EOD, consecutive EODs; odd cp 3 with padding), the
    document boundaries are the same global ones on every rank, and the shards' real labels add up to cp = 1's."""
    eod = 9

    class Source:
        def __getitem__(self, i):
            row = torch.randint(0, 5, (15,), generator=torch.Generator().manual_seed(i))
            row[row == 4] = eod
            if i % 2:
                row[0], row[-3], row[-2] = eod, eod, eod
            return row

    opts = DocumentOptions(eod, document_mask=True, reset_positions=True, eod_mask_loss=True)
    ref = TokenBatcher(Source(), micro_batch=2, dp=1, dp_rank=0, documents=opts).microbatch(0, 0)
    parts = [TokenBatcher(Source(), micro_batch=2, dp=1, dp_rank=0, cp=cp, cp_rank=r, layout=layout,
                          documents=opts).microbatch(0, 0) for r in range(cp)]
    padded = parts[0]["tokens"].shape[1] * cp
    for key in ("tokens", "labels", "positions"):
        full = torch.full((2, padded), -7, dtype=torch.long)
        for r, part in enumerate(parts):
            full[:, sequence_positions(padded, rank=r, world_size=cp, layout=layout)] = part[key]
        assert torch.equal(full[:, :14], ref[key]), key
        if key == "labels":
            assert (full[:, 14:] == IGNORE_INDEX).all()
    # global boundaries: cp = 1's, plus the padding's own document where the layout pads
    for row, ref_row in zip(parts[0]["cu_seqlens"].tolist(), ref["cu_seqlens"].tolist()):
        assert set(row) - ({padded} - {14}) == set(ref_row)
    assert all(torch.equal(p["cu_seqlens"], parts[0]["cu_seqlens"]) for p in parts)
    assert sum(float(p["count"]) for p in parts) == float(ref["count"])


def test_documents_of_a_dataset_without_a_sidecar_need_data_eod_id(tmp_path, corpus):
    """A dataset built elsewhere (no sidecar) with a document option and no data.eod_id: the EOD id fell back to the
    default byte tokenizer's 256, an ordinary token in e.g. GPT-2's vocabulary, so documents were cut at every
    occurrence of it, silently. Refused before any rank starts (and by the ranks); data.eod_id, or the sidecar,
    settles it; a dataset still to be prepared with the byte tokenizer keeps its 256."""
    bare = tmp_path / "bare"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{corpus}{suffix}", f"{bare}{suffix}")
    cfg = _gpt(tmp_path, str(bare), {"document_mask": True}, eval_every=0)
    with pytest.raises(ConfigError, match=r"^data.document_mask: data.path = .*bare has no sidecar \(bare.meta.json: "
                                          r"built elsewhere\) .* set data.eod_id"):
        check_data(cfg)
    with pytest.raises(ValueError, match="has no sidecar"):
        document_options(cfg.data)
    check_data(_gpt(tmp_path, str(bare), {"reset_positions": True, "eod_id": 256}, eval_every=0))
    assert document_options(_gpt(tmp_path, corpus, {"eod_mask_loss": True}, eval_every=0).data).eod_id == 256
    later = _gpt(tmp_path, str(tmp_path / "later"), {"document_mask": True, "prepare": "python-stdlib"}, eval_every=0)
    assert document_options(later.data).eod_id == 256
