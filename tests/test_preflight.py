"""Start-up checks before any rank starts (dist_train/preflight.py, dist_train/data/integrity.py): damaged
datasets, token ids beyond the vocabulary, unusable directories, missing or damaged resume checkpoints,
a kernel the device lacks. In process (fast), plus two real commands for the exit status and the fact
that no rank started."""
import json
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import CheckpointError, CheckpointManager
from dist_train.cli import main
from dist_train.config import CheckpointConfig, ConfigError, config_from_dict, load_config, load_yaml_unique
from dist_train.data.datasets import IndexedTokenDataset
from dist_train.data.integrity import check_bin_size, check_indexed_dataset, read_index
from dist_train.data.prepare import prepare_indexed
from dist_train.data.sidecar import sidecar_path
from dist_train.engines import cpu_autocast_refusal
from dist_train.models.gpt import GPT
from dist_train.models.swin import build_swin
from dist_train.preflight import check_data, check_model_fits, preflight
from tests.trainer_utils import run_cli, stale_file_handle_in, tiny_gpt_config, tiny_swin_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A byte-tokenized dataset: 3 documents, ids 0..256 (EOD 256), with its sidecar."""
    d = tmp_path_factory.mktemp("data")
    docs = d / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t * 40}) for t in ("alpha ", "beta gamma ", "delta\n")))
    prefix = str(d / "ds")
    prepare_indexed([docs], prefix)
    return prefix


def _copy(prefix: str, tmp_path: Path, sidecar: bool = True) -> str:
    out = str(tmp_path / "copy")
    for suffix in (".bin", ".idx") + ((".meta.json",) if sidecar else ()):
        Path(out + suffix).write_bytes(Path(prefix + suffix).read_bytes())
    return out


def _cfg(tmp_path: Path, prefix: str, **sections) -> "object":
    data = {"run": {"dir": str(tmp_path / "run")}, "model": {"vocab_size": 257},
            "data": {"source": "indexed", "path": prefix, "seq_len": 16}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def _refused(cfg, *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        preflight(cfg, on_cuda=False)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_a_good_dataset_passes_and_the_ids_come_from_the_sidecar_or_a_scan(dataset, tmp_path):
    preflight(_cfg(tmp_path, dataset), on_cuda=False)
    assert check_indexed_dataset(dataset, 257, 16)["source"] == "sidecar"
    bare = _copy(dataset, tmp_path, sidecar=False)
    info = check_indexed_dataset(bare, 257, 16)
    assert info["source"] == "scan" and info["max_token_id"] == 256
    assert not (tmp_path / "run").exists()  # preflight probes directories without creating them


def test_truncated_bin_is_refused(dataset, tmp_path):
    prefix = _copy(dataset, tmp_path)
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:len(data) // 3])
    _refused(_cfg(tmp_path, prefix), "copy.bin is", "the .bin is truncated")
    with pytest.raises(ValueError, match="truncated"):  # the dataset itself refuses it too
        IndexedTokenDataset(prefix, 16, 0)


def _shift_second_pointer(idx: bytes) -> bytes:
    n_seq = int.from_bytes(idx[18:26], "little")
    at = 34 + 4 * n_seq + 8  # the second int64 sequence pointer
    return idx[:at] + (int.from_bytes(idx[at:at + 8], "little") + 2).to_bytes(8, "little") + idx[at + 8:]


@pytest.mark.parametrize("damage, needle", [
    (_shift_second_pointer, "sequence pointers do not match its lengths"),
    (lambda b: b[:20], "shorter than the 34-byte header"),
    (lambda b: b[:-5], "truncated or damaged"),
    (lambda b: b"\x00garbage" * 20, "does not start with the Megatron index magic"),
    (lambda b: b"", "shorter than the 34-byte header"),
    (lambda b: b[:9] + (7).to_bytes(8, "little") + b[17:], "index version 7"),
    (lambda b: b[:17] + bytes([6]) + b[18:], "token dtype code 6"),
])
def test_truncated_or_garbage_idx_is_one_line(dataset, tmp_path, damage, needle):
    prefix = _copy(dataset, tmp_path)
    Path(prefix + ".idx").write_bytes(damage(Path(prefix + ".idx").read_bytes()))
    _refused(_cfg(tmp_path, prefix), needle)
    with pytest.raises(ValueError, match="data.path"):  # what the dataset runs when it opens the files
        check_bin_size(prefix, read_index(prefix))


def test_token_ids_beyond_the_vocabulary_are_refused_from_sidecar_and_scan(dataset, tmp_path):
    msg = _refused(_cfg(tmp_path, dataset, model={"vocab_size": 200}), "token id 256",
                   "outside model.vocab_size = 200", "model.vocab_size >= 257")
    assert "sidecar" in msg
    bare = _copy(dataset, tmp_path, sidecar=False)
    assert "a scan of copy.bin" in _refused(_cfg(tmp_path, bare, model={"vocab_size": 200}), "token id 256")


def test_sidecar_from_another_build_is_refused(dataset, tmp_path):
    prefix = _copy(dataset, tmp_path)
    meta = json.loads(sidecar_path(prefix).read_text())
    sidecar_path(prefix).write_text(json.dumps({**meta, "tokens": meta["tokens"] + 1}))
    _refused(_cfg(tmp_path, prefix), "belongs to another build")


def test_missing_data_and_tokenizer(tmp_path, dataset):
    _refused(_cfg(tmp_path, str(tmp_path / "nope"), data={"prepare": None}), "nope.bin and", "not found")
    _refused(_cfg(tmp_path, None), "data.path is not set")
    _refused(_cfg(tmp_path, dataset, data={"tokenizer": str(tmp_path / "tok.json")}),
             "data.tokenizer", "no such file")
    # a dataset still to be prepared: the tokenizer must fit the model
    _refused(_cfg(tmp_path, str(tmp_path / "later"), data={"prepare": "python-stdlib"}, model={"vocab_size": 100}),
             "has 257 tokens but model.vocab_size = 100")


def test_a_dataset_path_naming_one_of_its_files_or_its_directory_names_the_prefix(tmp_path, dataset):
    """data.path: data/train.bin (or a held-out .idx) used to get 'data/train.bin.bin not found; build it with ...
    --output data/train.bin', advice that builds a second dataset."""
    msg = _refused(_cfg(tmp_path, dataset + ".bin"), "did you mean " + dataset + "?")
    assert "build it" not in msg
    _refused(_cfg(tmp_path, dataset, data={"valid_path": dataset + ".idx"}, train={"eval_every": 1, "eval_steps": 1}),
             "data.valid_path", "did you mean " + dataset + "?")
    _refused(_cfg(tmp_path, str(Path(dataset).parent)), "is a directory; a dataset path is the prefix of its "
             ".bin/.idx, e.g. " + dataset)
    assert "build it with" in _refused(_cfg(tmp_path, str(tmp_path / "nope")))  # no dataset near: build one


def test_held_out_dataset_is_checked_like_the_training_one(tmp_path, dataset):
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps({"text": t * 40}) for t in ("omega ", "psi chi ", "zeta\n")))
    held = str(tmp_path / "held")
    prepare_indexed([tmp_path / "held.jsonl"], held)
    preflight(_cfg(tmp_path, dataset, data={"valid_path": held}, train={"eval_every": 2}), on_cuda=False)
    _refused(_cfg(tmp_path, dataset, data={"valid_path": str(tmp_path / "missing")}, train={"eval_every": 2}),
             "data.valid_path = ", "missing.bin not found")
    small = _cfg(tmp_path, dataset, data={"valid_path": held}, model={"vocab_size": 100})
    _refused(small, "data.valid_path = ", "model.vocab_size")


@pytest.mark.parametrize("key", ["data.path", "data.valid_path"])
def test_a_damaged_dataset_is_named_by_the_key_that_names_it(tmp_path, dataset, key):
    """Both datasets pass the same checks, which take the key the config names the dataset with: each message names
    the right one (a truncated .bin: the size check, also the ranks' dataset's; a truncated .idx: the index reader)."""
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps({"text": t * 40}) for t in ("omega ", "psi chi ", "zeta\n")))
    held = str(tmp_path / "held")
    prepare_indexed([tmp_path / "held.jsonl"], held)
    train = _copy(dataset, tmp_path)
    damaged = train if key == "data.path" else held
    cfg = _cfg(tmp_path, train, data={"valid_path": held}, train={"eval_every": 2})
    binary = Path(damaged + ".bin")
    binary.write_bytes(binary.read_bytes()[:-2])
    _refused(cfg, f"{key} = {damaged}: {binary} is ", "the .bin is truncated")
    with pytest.raises(ValueError, match=f"^{key} = {damaged}: {binary} is "):  # a rank's own check, the same way
        IndexedTokenDataset(damaged, 16, 0, key=key)
    binary.write_bytes(binary.read_bytes() + b"\0\0")
    index = Path(damaged + ".idx")
    index.write_bytes(index.read_bytes()[:20])
    msg = _refused(cfg, f"{key} = {damaged}: {index} is 20 bytes, shorter than")
    assert msg.startswith(key + " = "), msg


def test_a_held_out_dataset_that_is_the_training_data_is_refused(tmp_path, dataset):
    """data.valid_path naming data.path itself, or a copy of it: the validation loss measured the training samples
    (train/validation overlap of 100%), silently. Refused naming why: the same file, or equal digests."""
    _refused(_cfg(tmp_path, dataset, data={"valid_path": dataset}, train={"eval_every": 2}),
             f"data.valid_path = {dataset} holds the training data of data.path = {dataset} (the same .bin file)")
    copy = _copy(dataset, tmp_path)
    _refused(_cfg(tmp_path, dataset, data={"valid_path": copy}, train={"eval_every": 2}), "(equal xxh3_64 digests: a copy)")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # built elsewhere (no sidecars): their fingerprints
    bare_train, bare_held = _copy(dataset, tmp_path / "a", sidecar=False), _copy(dataset, tmp_path / "b", sidecar=False)
    _refused(_cfg(tmp_path, bare_train, data={"valid_path": bare_held}, train={"eval_every": 2}),
             "(equal xxh3_64-sampled digests: a copy)")


def test_unusable_run_and_checkpoint_directories(tmp_path, dataset):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(_cfg(tmp_path, dataset, run={"dir": str(a_file)}), "run.dir", "is a file, not a directory")
    _refused(_cfg(tmp_path, dataset, run={"dir": str(a_file / "sub")}), "cannot be created", "is a file")
    _refused(_cfg(tmp_path, dataset, checkpoint={"dir": str(a_file)}), "checkpoint.dir", "is a file")
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "checkpoints").write_text("x")
    _refused(_cfg(tmp_path, dataset, run={"dir": str(tmp_path / "run2")}), "checkpoints", "is a file")
    _refused(_cfg(tmp_path, dataset, run={"dir": "/proc/dist_train_run"}), "not writable")


def test_a_model_whose_states_exceed_the_memory_is_refused(tmp_path, dataset):
    huge = {"d_model": 16384, "n_layers": 400, "n_heads": 128}
    _refused(_cfg(tmp_path, dataset, model=huge), "model: ", "B parameters need", "GiB per rank for weights",
             "parallel.tp")
    with pytest.raises(ConfigError, match="data.eod_id = 300 is outside model.vocab_size = 257"):
        _cfg(tmp_path, dataset, data={"eod_id": 300})


def _llama70b(tmp_path: Path, checkpoint: dict, **parallel):
    """A Llama-70B-shaped GPT under FSDP2 (bf16) on 64 ranks: its sharded states fit an 80 GiB device."""
    return config_from_dict({"run": {"dir": str(tmp_path / "run")}, "data": {"source": "synthetic", "seq_len": 4096},
                             "model": {"d_model": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8,
                                       "ffn_hidden": 28672, "vocab_size": 128256},
                             "train": {"precision": "bf16", "global_batch": 256},
                             "parallel": {"fsdp": True, "dp": 8, "tp": 8, **parallel}, "checkpoint": checkpoint})


def test_fsdp2_tp_runs_that_checkpoint_are_not_refused_for_a_gather(tmp_path):
    """FSDP2 × tp saves and loads each rank's own blocks of the checkpoint's tensors (checkpoint/adapters.py
    ``fsdp_rectangles``): nothing is gathered, so the 70B tp = 8 layout whose sharded states fit an 80 GiB H100
    passes whether it saves or resumes (it was refused when the checkpoint all-gathered ~123 GiB per rank), and the
    size check still refuses states that do not fit (CUDA profile; no device needed)."""
    off = {"every": 0, "at_end": False, "resume": "none"}
    (tmp_path / "run" / "checkpoints" / "step_10").mkdir(parents=True)  # resume auto finds one to load
    for checkpoint in ({}, {**off, "every": 100}, {**off, "resume": "auto"}, off):
        check_model_fits(_llama70b(tmp_path, checkpoint), on_cuda=True, ranks_per_host=1)
    with pytest.raises(ConfigError, match="GiB per rank for weights, gradients and optimizer state alone"):
        check_model_fits(_llama70b(tmp_path, {}, dp=2, tp=2), on_cuda=True, ranks_per_host=1)


def test_flash_kernel_on_cpu_is_refused(tmp_path, dataset):
    _refused(_cfg(tmp_path, dataset, parallel={"attn_kernel": "flash"}), "parallel.attn_kernel = 'flash' on cpu")
    _refused(_cfg(tmp_path, dataset, parallel={"attn_kernel": "cuda"}), "parallel.attn_kernel = 'cuda' on cpu",
             "needs CUDA tensors")


def test_bf16_through_megatrons_tp_linears_on_cpu_is_refused_and_the_layouts_that_run_are_not(tmp_path, dataset):
    """tp2 in bf16 on CPU under the DDP engine died in Megatron's backward (a bf16 gradient against the fp32
    weight: its layers restore autocast only on CUDA); sequence parallelism, FSDP2, a pipeline, ZeRO and fp32
    run (each was run on CPU ranks), and CUDA is untouched."""
    def cfg(**parallel):
        return _cfg(tmp_path, dataset, parallel={"dp": 1, "tp": 2, "ulysses_degree": 1, **parallel},
                    model={"n_heads": 4, "n_kv_heads": 2}, train={"precision": "bf16", "global_batch": 8})
    _refused(cfg(), "train.precision = bf16 (bf16 autocast) with parallel.tp = 2 on CPU",
             "use train.precision: fp32 (the CPU default), parallel.sequence_parallel: true")
    for layout in ({"sequence_parallel": True}, {"fsdp": True, "dp": 2}, {"pp": 2}, {"zero_stage": 1}, {"tp": 1}):
        assert cpu_autocast_refusal(cfg(**layout), torch.bfloat16, "cpu") is None, layout
    assert cpu_autocast_refusal(cfg(), torch.bfloat16, "cuda") is None
    assert cpu_autocast_refusal(cfg(), None, "cpu") is None  # fp32
    assert cpu_autocast_refusal(cfg(), torch.bfloat16, "cpu", forward_only=True) is None  # an evaluation: no backward


def _save(root: Path, steps: list[int]) -> list[Path]:
    mgr = CheckpointManager(CheckpointConfig(keep_last=5, dir=str(root)), run_dir=root)
    model = torch.nn.Linear(3, 2)
    for s in steps:
        mgr.save(s, model, extra={"step": s, "consumed_samples": 0})
    mgr.close()
    return [root / f"step_{s}" for s in steps]


def _damage(ckpt: Path) -> None:
    (ckpt / "train_state.json").write_text("{}")


def test_resume_path_missing_or_damaged_and_all_damaged(tmp_path, dataset):
    root = tmp_path / "ck"
    first, second = _save(root, [1, 2])
    ok = _cfg(tmp_path, dataset, checkpoint={"dir": str(root), "resume": str(second)})
    preflight(ok, on_cuda=False)
    _refused(_cfg(tmp_path, dataset, checkpoint={"resume": str(tmp_path / "step_9")}), "no such checkpoint")
    _damage(second)
    _refused(_cfg(tmp_path, dataset, checkpoint={"resume": str(second)}), f"checkpoint.resume = {second}: damaged",
             "train_state.json")
    auto = _cfg(tmp_path, dataset, checkpoint={"dir": str(root), "resume": "auto"})
    preflight(auto, on_cuda=False)  # step_1 still verifies: auto falls back to it
    _damage(first)
    _refused(auto, "every checkpoint under", "step_2:", "step_1:", "move them away")
    _refused(_cfg(tmp_path, dataset, checkpoint={"dir": str(root), "resume": "none"}),
             f"checkpoint.resume = none, but {root} holds checkpoints (step_2, step_1) of an earlier run")
    preflight(_cfg(tmp_path, dataset, checkpoint={"dir": str(tmp_path / "new"), "resume": "none"}), on_cuda=False)
    _refused(_cfg(tmp_path, dataset, checkpoint={"resume": str(root)}), "every checkpoint is damaged")
    (tmp_path / "empty").mkdir()
    _refused(_cfg(tmp_path, dataset, checkpoint={"resume": str(tmp_path / "empty")}), "no step_N checkpoint")


def test_one_preflight_reads_each_index_and_each_sidecar_once(tmp_path, dataset, monkeypatch):
    """The dataset checks read each .idx (a pass over its sequence table) once, and the resume check takes the
    training data's sample count from them instead of opening the dataset again; the same-data, tokenizer, overlap
    and end-of-document checks use the sidecars check_indexed_dataset read (data.path's was read 3 times: there, by
    the named-tokenizer check and twice by the end-of-document check)."""
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps({"text": t * 40}) for t in ("omega ", "psi chi ")))
    held = str(tmp_path / "held")
    prepare_indexed([tmp_path / "held.jsonl"], held)
    root = tmp_path / "ck"
    _save(root, [1])
    cfg = _cfg(tmp_path, dataset, data={"valid_path": held, "document_mask": True}, train={"eval_every": 2},
               checkpoint={"dir": str(root), "resume": "auto"})
    opened, read = [], []
    real_open, real_read_text = Path.open, Path.read_text
    monkeypatch.setattr(Path, "open", lambda self, *a, **kw: opened.append(self.name) or real_open(self, *a, **kw))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **kw: read.append(self.name)
                        or real_read_text(self, *a, **kw))
    preflight(cfg, on_cuda=False)
    assert sorted(n for n in opened if n.endswith(".idx")) == ["ds.idx", "held.idx"], opened
    assert read.count("held.meta.json") == 1, read
    assert [n for n in opened if n.endswith(".meta.json")] == ["held.meta.json", "ds.meta.json"], opened


def test_a_key_given_twice_is_refused_and_merges_still_load(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  kind: gpt\n  d_model: 64\n  d_model: 128\n")
    with pytest.raises(ConfigError, match=r"twice.yaml': key 'd_model' is given twice in one mapping \(lines 3 and 4\)"):
        load_config(twice)
    merged = tmp_path / "merged.yaml"  # a `<<:` merge overriding a key is deliberate, not a duplicate
    merged.write_text("base: &b {d_model: 64, n_layers: 2}\nmodel:\n  <<: *b\n  d_model: 128\n")
    assert load_yaml_unique(merged.read_text(), "merged")["model"] == {"d_model": 128, "n_layers": 2}


def test_empty_yaml_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)



def test_cli_data_problems_exit_2_with_one_line_before_any_rank(dataset, tmp_path, capsys):
    prefix = _copy(dataset, tmp_path)
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:1000 % len(data)])
    run_dir = tmp_path / "run"
    common = ["--set", f"data.path={prefix}", "--set", f"run.dir={run_dir}", "--set", "data.seq_len=16"]
    cases = [(["launch", "configs/gpt_tiny.yaml", "--backend", "local", *common], "is truncated"),
             (["run", "configs/gpt_tiny.yaml", *common, "--set", "parallel.dp=1",
               "--set", f"data.path={dataset}", "--set", "model.vocab_size=100"], "outside model.vocab_size = 100")]
    # the launch through a real process (exit status, stderr as a user sees them), the run in-process through
    # the same main() (a subprocess costs seconds of imports)
    for i, (args, needle) in enumerate(cases):
        if i == 0:
            r = run_cli(*args)
            code, err = r.returncode, r.stderr
        else:
            code, err = main(args), capsys.readouterr().err
        assert code == 2, (args, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], err[-2000:]
        assert not run_dir.exists()


def _damage_newest(root: Path, how: str) -> None:
    """Damage ``root/step_2`` the ways a resume meets: never finished (no manifest), a small file the pre-flight
    checksums, or shard bytes that only the loading ranks check (the size still matches)."""
    newest = root / "step_2"
    if how == "unfinished":
        (newest / "manifest.json").unlink()
    elif how == "small_file":
        _damage(newest)
    elif how == "shard":
        shard = sorted(newest.glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))


def _manager_verdict(root: Path, mode: str) -> str:
    """The checkpoint the manager resumes from (``step_N``) with ``checkpoint.resume = mode``, or ``refused``."""
    mgr = CheckpointManager(CheckpointConfig(keep_last=5, dir=str(root), resume=mode), run_dir=root)
    try:
        return f"step_{mgr.resume(torch.nn.Linear(3, 2))['step']}"
    except (CheckpointError, ValueError):
        return "refused"


@pytest.mark.parametrize("damage,resume,verdict", [
    # resume = the checkpoint dir itself, its newest damaged: as auto, the newest complete one that verifies
    ("unfinished", "dir", "step_1"), ("small_file", "dir", "step_1"), ("shard", "dir", "step_1"),
    ("none", "dir", "step_2"),
    # an explicit step_N older than a newer checkpoint there, damaged or not, stays refused (move them away)
    ("none", "step_1", "refused"), ("unfinished", "step_1", "refused"), ("shard", "step_1", "refused"),
    # another run's checkpoint dir, older than this run's newest: refused
    ("none", "other_dir", "refused"),
])
def test_preflight_and_the_manager_agree_on_a_resume_dir(tmp_path, dataset, damage, resume, verdict):
    """Pre-flight (before any rank starts) and the checkpoint manager (in the ranks) take their candidates from
    one function: pre-flight passes exactly when the manager resumes. Pre-flight cannot see shard bytes (the
    loading ranks check them): it passes on step_2 there and the manager falls back to step_1, one warning."""
    root = tmp_path / "ck"
    _save(root, [1, 2])
    _damage_newest(root, damage)
    path = {"dir": root, "step_1": root / "step_1", "other_dir": tmp_path / "other"}[resume]
    if resume == "other_dir":
        _save(path, [1])
    cfg = _cfg(tmp_path, dataset, checkpoint={"dir": str(root), "resume": str(path)})
    if verdict == "refused":
        _refused(cfg, f"checkpoint.resume = {path} is at step 1, but {root} holds newer checkpoints (step_2)")
    else:
        preflight(cfg, on_cuda=False)
    assert _manager_verdict(root, str(path)) == verdict
    assert (root / "step_2").is_dir()  # a damaged checkpoint is left for inspection, never deleted by a resume


def test_resume_path_older_than_the_newest_in_the_checkpoint_dir_is_refused(tmp_path, dataset):
    root = tmp_path / "ck"
    first, _ = _save(root, [1, 2])
    _refused(_cfg(tmp_path, dataset, checkpoint={"dir": str(root), "resume": str(first)}),
             f"checkpoint.resume = {first} is at step 1, but {root} holds newer checkpoints (step_2)")
    preflight(_cfg(tmp_path, dataset, checkpoint={"dir": str(tmp_path / "other"), "resume": str(first)}),
              on_cuda=False)  # another run's checkpoint dir: nothing newer there


@pytest.mark.parametrize("option", ["document_mask", "reset_positions", "eod_mask_loss"])
def test_a_document_option_whose_end_of_document_id_is_outside_the_vocabulary_is_refused(tmp_path, option):
    """Synthetic data with model.vocab_size 64 and the byte tokenizer's EOD id 256: no token can ever end a
    document, so the option silently did nothing (a benchmark of packed attention measured unpacked attention)."""
    cfg = tiny_gpt_config(tmp_path / "run", data={option: True})
    with pytest.raises(ConfigError) as info:
        preflight(cfg, on_cuda=False)
    assert f"data.{option}" in str(info.value) and "256" in str(info.value) and "data.eod_id" in str(info.value)
    preflight(tiny_gpt_config(tmp_path / "run", data={option: True, "eod_id": 3}), on_cuda=False)


@pytest.mark.parametrize("split, train, needle", [("99,1,0", {"eval_every": 2}, "data.split: the part ["),
                                                  ("1,99,0", {}, "data.split: the part [0, 0)"),
                                                  ("99,1,0", {}, None),
                                                  ("50,50,0", {"eval_every": 2, "eval_steps": 1, "global_batch": 4}, None)])
def test_an_empty_share_of_data_split_is_refused_before_any_rank_starts(split, train, needle, tmp_path, dataset):
    """The dataset's samples under data.split: an empty training share (or validation share, when validation reads
    it) was refused by every rank's dataset after start-up; it depends on the config and the files alone."""
    cfg = _cfg(tmp_path, dataset, data={"split": split, "seq_len": 64}, train=train)
    if needle is None:
        check_data(cfg)
        return
    with pytest.raises(ConfigError) as e:
        check_data(cfg)
    assert str(e.value).startswith(needle) and "is empty" in str(e.value), str(e.value)


def test_an_io_error_on_the_newest_checkpoint_is_no_fall_back_in_the_preflight_either(tmp_path, dataset, monkeypatch):
    """EIO/ESTALE while reading the newest checkpoint says nothing about its bytes: the manager neither falls back to
    an older one nor calls it damaged (restartable), and the pre-flight's verdict is the same — one line naming the
    I/O error, not 'damaged', and not a pass that would have the ranks resume an older step."""
    root = tmp_path / "ck"
    _save(root, [1, 2])
    stale_file_handle_in(monkeypatch, "step_2")
    msg = _refused(_cfg(tmp_path, dataset, checkpoint={"dir": str(root), "resume": "auto"}), "step_2",
                   "Stale file handle", "try again")
    assert "damaged" not in msg, msg
    assert _manager_verdict(root, "auto") == "refused"
    monkeypatch.undo()
    preflight(_cfg(tmp_path, dataset, checkpoint={"dir": str(root), "resume": "auto"}), on_cuda=False)


def test_a_resume_into_a_model_of_another_size_is_refused_before_any_rank_whatever_allow_config_change_lists(
        tmp_path, dataset):
    small = _cfg(tmp_path, dataset, model={"d_model": 32, "n_heads": 2, "n_layers": 1},
                 checkpoint={"dir": str(tmp_path / "ck")})
    mgr = CheckpointManager(small.checkpoint, run_dir=tmp_path / "run", config=small.to_dict())
    mgr.save(1, GPT(small.model), extra={"step": 1, "consumed_samples": 0})
    mgr.close()
    preflight(small, on_cuda=False)  # the same model resumes
    wider = {"d_model": 64, "n_heads": 2, "n_layers": 1}
    _refused(_cfg(tmp_path, dataset, model=wider, checkpoint={
        "dir": str(tmp_path / "ck"), "allow_config_change": ["model.d_model", "model.ffn_hidden", "model.head_dim"]}),
        "holds a model of another size than this config's: model.d_model 32 -> 64",
        "tensor(s) of other shapes, e.g.", "whatever checkpoint.allow_config_change lists", "another run.dir")
    _refused(_cfg(tmp_path, dataset, model={"d_model": 32, "n_heads": 2, "n_layers": 2},
                  checkpoint={"dir": str(tmp_path / "ck")}),
             "model.n_layers 1 -> 2", "9 tensor(s) in only one of them, e.g. layers.1.", "in another run.dir")
    _refused(_cfg(tmp_path, dataset, model=wider, checkpoint={"resume": str(tmp_path / "ck" / "step_1")}),
             "model.d_model 32 -> 64", "or start this model from scratch (checkpoint.resume: none)")


def _swin(tmp_path: Path, model=None, parallel=None, **checkpoint):
    return tiny_swin_config(tmp_path / "run", tmp_path / "weather", model={"n_layers": 4, **(model or {})},
                            parallel=parallel or {}, checkpoint={"dir": str(tmp_path / "ck"), **checkpoint})


def test_a_swin_resume_into_another_size_is_refused_before_any_rank_and_into_another_layout_passes(tmp_path, capsys):
    saved = _swin(tmp_path)  # the manifest's tensor table is the tp=1 single-tile Swin's, whatever the layout
    mgr = CheckpointManager(saved.checkpoint, run_dir=tmp_path / "run", config=saved.to_dict())
    mgr.save(1, build_swin(saved.model, wp_group=None, grid=(1, 1)), extra={"step": 1, "consumed_samples": 0})
    mgr.close()
    for layout in ({}, {"wp": [1, 2]}, {"wp": [2, 1]}, {"tp": 2}, {"tp": 2, "wp": [1, 2]}, {"pp": 2}):
        preflight(_swin(tmp_path, parallel=layout), on_cuda=False)
    for model, needles in [
            ({"d_model": 32}, ("model.d_model 16 -> 32", "tensor(s) of other shapes, e.g. ",
                               "saved [32, 16], now [32, 32]")),
            ({"n_layers": 6}, ("model.n_layers 4 -> 6", "tensor(s) in only one of them, e.g. blocks.4.")),
            ({"window": 2}, ("model.window 4 -> 2", "saved [2, 7, 7], now [2, 3, 3]")),  # the relative position bias
            ({"patch_size": 2}, ("model.patch_size 1 -> 2", "embed.weight saved [16, 2], now [16, 8]"))]:
        _refused(_swin(tmp_path, model=model, allow_config_change=[f"model.{k}" for k in model]),
                 "holds a model of another size than this config's: ", *needles,
                 "whatever checkpoint.allow_config_change lists", "another run.dir")
    # the command a user types: exit 2, one line, no rank started (no run directory)
    args = ["launch", "configs/swin_weather.yaml", "--backend", "local", "--set", f"run.dir={tmp_path / 'run'}",
            "--set", f"data.path={tmp_path / 'weather'}", "--set", f"checkpoint.dir={tmp_path / 'ck'}",
            "--set", "model.in_channels=2", "--set", "model.out_channels=2", "--set", "data.channels=2",
            "--set", "model.window=4", "--set", "model.n_layers=4", "--set", "model.ffn_hidden=32"]
    assert main(args) == 2  # model.d_model is the yaml's 32, the checkpoint's 16
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.d_model 16 -> 32" in lines[0], lines
    assert not (tmp_path / "run").exists()
