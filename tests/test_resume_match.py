"""Resume must match the model exactly (issues 13.3, 14.4): every model-config difference is refused in one
line naming each key (unless allowed by ``checkpoint.allow_config_change``), missing/unexpected/mis-shaped
tensors are refused in one line, exit 2; changed training hyper-parameters are applied from the resume step."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from dist_train.checkpoint import CheckpointManager
from dist_train.checkpoint.compat import ResumeMismatchError
from dist_train.checkpoint.manager import CheckpointDirInUse
from dist_train.checkpoint.manifest import read_manifest, write_manifest
from dist_train.config import ConfigError
from dist_train.data import datasets, fingerprint
from dist_train.data.fingerprint import BLOCK, SAMPLES, dataset_fingerprint, digest_kind
from dist_train.data.prepare import prepare_indexed
from dist_train.optim import lr_lambda
from dist_train.preflight import preflight
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.test_ckpt_common import CkptCfg
from tests.trainer_utils import rel_close, tiny_gpt_config, tiny_swin_config

REPO = Path(__file__).resolve().parents[1]

# key -> a different value the tiny GPT can still be built with (the saved run uses the defaults below)
CHANGES = {
    "model.d_model": 64,
    "model.n_layers": 1,
    "model.n_heads": 2,
    "model.n_kv_heads": 4,
    "model.ffn_hidden": 128,
    "model.vocab_size": 96,
    "model.rope_theta": 500000.0,
    "model.norm_eps": 1e-6,
    "model.tie_embeddings": True,
    "model.attention_window": 8,
    "model.head_dim": 16,
    "model.rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("saved") / "run"
    train(tiny_gpt_config(run, steps=2, checkpoint={"at_end": True}))
    return run


def _resume(run: Path, steps: int = 3, model=None, checkpoint=None, train_over=None, name="resumed"):
    out = Path(tempfile.mkdtemp(dir=run.parent, prefix=name))
    ck = {"resume": str(run / "checkpoints"), "dir": str(out / "checkpoints"), "at_end": False, **(checkpoint or {})}
    cfg = tiny_gpt_config(out, steps=steps, checkpoint=ck, train=train_over or {},
                          **({"model": model} if model else {}))
    res = train(cfg)
    res.summary["run_dir"] = str(out)
    return res


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_every_model_config_difference_is_refused_in_one_line(saved, key):
    field = key.split(".", 1)[1]
    with pytest.raises(ResumeMismatchError) as info:
        _resume(saved, model={field: CHANGES[key]})
    msg = str(info.value)
    assert "\n" not in msg and info.value.exit_code == 2
    assert f"{key} " in msg and repr(CHANGES[key]) in msg and "checkpoint.allow_config_change: [" in msg, msg


def test_every_difference_is_listed_and_allowed_ones_pass(saved, capsys):
    with pytest.raises(ResumeMismatchError, match=r"model.rope_theta 10000.0 -> 20000.0, model.norm_eps 1e-05 -> "
                                                  r"0.001; resume refused.*\[model.rope_theta, model.norm_eps\]"):
        _resume(saved, model={"rope_theta": 20000.0, "norm_eps": 1e-3})
    capsys.readouterr()
    res = _resume(saved, model={"attention_window": 8}, checkpoint={"allow_config_change": ["model.attention_window"]})
    assert res.start_step == 2 and len(res.losses) == 1
    assert "resume: model.attention_window None -> 8 (allowed by checkpoint.allow_config_change)" in \
        capsys.readouterr().out
    # init_std only shapes the initial weights: free to differ
    assert _resume(saved, model={"init_std": 0.5}).start_step == 2


def test_explicit_sizes_equal_to_the_derived_defaults_are_no_change(saved):
    """An HF import writes ffn_hidden/head_dim explicitly; the saved run left them null (d=32: SwiGLU 96,
    d/heads = 8): the same model, so the resume goes ahead, and an explicit different size is still refused."""
    assert _resume(saved, model={"ffn_hidden": 96, "head_dim": 8}).start_step == 2
    with pytest.raises(ResumeMismatchError, match=r"model.ffn_hidden 96 -> 128"):
        _resume(saved, model={"ffn_hidden": 128})


def test_a_finished_run_started_again_says_so_and_keeps_its_summary(tmp_path, capsys):
    cfg = tiny_gpt_config(tmp_path / "run", steps=2, checkpoint={"at_end": True})
    train(cfg)
    summary = (tmp_path / "run" / "summary.json").read_text()
    capsys.readouterr()
    res = train(cfg)
    assert res.start_step == 2 and res.losses == []
    out = capsys.readouterr().out
    assert "nothing to train: " in out and "step_2 is at step 2 and train.steps = 2" in out, out
    # the way out it names must not be one that resume refuses (resume=none into a dir of checkpoints)
    assert "resume=none" not in out and "another run.dir or checkpoint.dir" in out, out
    with pytest.raises(CheckpointDirInUse):
        train(tiny_gpt_config(tmp_path / "run", steps=2, checkpoint={"at_end": True, "resume": "none"}))
    assert (tmp_path / "run" / "summary.json").read_text() == summary


class _Stack(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))


def _mgr(root: Path, **kw) -> CheckpointManager:  # no config recorded: only the tensor table can tell
    return CheckpointManager(CkptCfg(dir=str(root), **kw), run_dir=root, config={}, layout={"world_size": 1})


@pytest.mark.parametrize("widths, expect", [
    ([4, 4], "2 saved tensor(s) the model does not have (model.layers.1.bias, model.layers.1.weight)"),
    ([4, 4, 4, 4], "2 tensor(s) of the model not in the checkpoint (model.layers.2.bias, model.layers.2.weight)"),
    ([4, 5, 4], "3 shape mismatch(es) (model.layers.0.bias saved [4], model [5]; model.layers.0.weight saved "
                "[4, 4], model [5, 4]; model.layers.1.weight saved [4, 4], model [4, 5])"),
])
def test_missing_unexpected_and_misshaped_tensors_are_one_line(tmp_path, widths, expect):
    _mgr(tmp_path).save(1, _Stack([4, 4, 4]))
    with pytest.raises(ResumeMismatchError) as info:
        _mgr(tmp_path, resume="auto").resume(_Stack(widths))
    assert "\n" not in str(info.value) and expect in str(info.value), str(info.value)


def test_changed_lr_and_schedule_apply_from_the_resume_step(saved, capsys):
    capsys.readouterr()
    res = _resume(saved, steps=6, train_over={"lr": 5e-3, "warmup_steps": 1})
    assert res.start_step == 2
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume: ")]
    assert len(said) == 1 and "train.lr 0.01 -> 0.005" in said[0] and "train.steps 2 -> 6" in said[0] \
        and "train.warmup_steps 2 -> 1" in said[0] and "applied from step 3" in said[0], said
    cfg = tiny_gpt_config("x", steps=6, train={"lr": 5e-3, "warmup_steps": 1})
    lrs = [json.loads(line)["lr"] for line in (Path(res.summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    # the new schedule evaluated at the optimizer steps taken so far (2, 3, 4, 5)
    assert lrs == pytest.approx([5e-3 * lr_lambda(cfg.train)(s) for s in range(2, 6)], rel=1e-12)


def test_every_other_difference_is_named_once_on_resume(saved, capsys):
    """Keys a resume neither refuses nor re-applies (gradient clipping, logging, the loss chunk) take the current
    value from the resume step on, and one line names each of them with both values."""
    capsys.readouterr()
    res = _resume(saved, train_over={"grad_clip": 0.5, "log_every": 2, "loss_chunk": 16})
    assert res.start_step == 2
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume: ")]
    assert len(said) == 2 and "train.steps 2 -> 3" in said[0], said
    assert "train.grad_clip 1.0 -> 0.5, train.log_every 1 -> 2, train.loss_chunk 'auto' -> 16 (differ from the " \
           "checkpoint): as configured now from step 3 on" in said[1], said
    assert "train.steps" not in said[1] and "run." not in said[1] and "checkpoint." not in said[1]


def test_preflight_refuses_a_mismatch_before_any_rank_starts(saved, tmp_path):
    cfg = tiny_gpt_config(tmp_path / "pre", steps=3, model={"rope_theta": 500000.0},
                          checkpoint={"resume": str(saved / "checkpoints")})
    with pytest.raises(ConfigError, match=r"model.rope_theta 10000.0 -> 500000.0; resume refused"):
        preflight(cfg, on_cuda=False)
    allowed = tiny_gpt_config(tmp_path / "pre", steps=3, model={"rope_theta": 500000.0},
                              checkpoint={"resume": str(saved / "checkpoints"),
                                          "allow_config_change": ["model.rope_theta"]})
    preflight(allowed, on_cuda=False)


@pytest.mark.slow
def test_cli_mismatch_is_one_line_exit_2(saved):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "dist_train.cli", "run", str(REPO / "configs" / "gpt_tiny.yaml"),
                          "--set", f"run.dir={saved.parent / 'cli'}", "--set", "parallel.dp=1",
                          "--set", "data.source=synthetic", "--set", "data.seq_len=32", "--set", "model.d_model=32",
                          "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.vocab_size=64",
                          "--set", "model.n_layers=3", "--set", f"checkpoint.resume={saved / 'checkpoints'}",
                          "--set", "train.progress=false"], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "model.n_layers 2 -> 3" in lines[0] and lines[0].startswith("dist-train: error: checkpoint "), lines


@pytest.mark.parametrize("section,key,value", [("run", "seed", 8), ("data", "seq_len", 16)])
def test_a_change_of_what_consumed_samples_points_at_is_refused(saved, section, key, value):
    """run.seed orders the samples and data.seq_len/split/path/source decide what sample N is: a resume that
    changes one continues at ``consumed_samples`` in another order, silently repeating or skipping data."""
    out = Path(tempfile.mkdtemp(dir=saved.parent, prefix="data_change"))
    ck = {"resume": str(saved / "checkpoints"), "dir": str(out / "checkpoints"), "at_end": False}
    cfg = tiny_gpt_config(out, steps=3, checkpoint=ck)
    changed = {**getattr(cfg, section).__dict__, key: value}
    with pytest.raises(ResumeMismatchError, match=rf"{section}.{key} .* -> {value!r}; resume refused") as info:
        train(tiny_gpt_config(out, steps=3, checkpoint=ck, **{section: changed}))
    assert "\n" not in str(info.value) and f"allow_config_change: [{section}.{key}]" in str(info.value)
    if key == "seed":  # listed as allowed, it goes ahead (and says so)
        allowed = {**ck, "allow_config_change": ["run.seed"]}
        assert train(tiny_gpt_config(out, steps=3, checkpoint=allowed, run=changed)).start_step == 2


def test_data_order_keys_are_free_before_the_first_sample_is_consumed(tmp_path):
    """A checkpoint that consumed no sample (an HF/DCP import: step 0, which may record data.seq_len) has no
    data order to keep: a new seed or sequence length is no change; once samples were consumed it is."""
    model = nn.Linear(3, 2)
    saved = {"model": {"kind": "gpt"}, "run": {"seed": 7}, "data": {"seq_len": 32}}
    CheckpointManager(CkptCfg(dir=str(tmp_path)), run_dir=tmp_path, config=saved).save_tensors(
        0, {"weight": model.weight.detach(), "bias": model.bias.detach()})
    current = {"model": {"kind": "gpt"}, "run": {"seed": 8}, "data": {"seq_len": 64}}
    assert CheckpointManager(CkptCfg(dir=str(tmp_path)), run_dir=tmp_path, config=current).resume(
        nn.Linear(3, 2))["step"] == 0
    later = tmp_path / "later" / "step_1"  # the same checkpoint, 8 samples consumed
    shutil.copytree(tmp_path / "step_0", later)
    state = json.loads((later / "train_state.json").read_text())
    state["extra"]["consumed_samples"] = 8
    (later / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(ResumeMismatchError, match=r"run.seed 7 -> 8, data.seq_len 32 -> 64"):
        CheckpointManager(CkptCfg(dir=str(later.parent)), run_dir=tmp_path, config=current).load(
            later, nn.Linear(3, 2), verify=False)


def test_a_dataset_replaced_at_the_same_path_is_refused(tmp_path):
    """data.path unchanged but the dataset there re-prepared (another corpus, another tokenizer file): the sample
    count differs, so consumed_samples points into another permutation. Refused unless data.path is allowed."""
    docs = tmp_path / "docs.jsonl"
    prefix = str(tmp_path / "ds")
    docs.write_text("\n".join(json.dumps({"text": t * 40}) for t in ("alpha ", "beta gamma ", "delta\n")))
    prepare_indexed([docs], prefix)
    data = {"source": "indexed", "path": prefix, "seq_len": 32}
    model = {"vocab_size": 257}
    run = tmp_path / "run"
    train(tiny_gpt_config(run, steps=2, data=data, model=model, checkpoint={"at_end": True}))
    docs.write_text("\n".join(json.dumps({"text": t * 80}) for t in ("epsilon ", "zeta eta ", "theta\n")))
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(prefix + suffix).unlink(missing_ok=True)
    prepare_indexed([docs], prefix)
    refusal = r"step_2 was trained on 28 samples of data.path .*ds, it now has 57: the dataset"
    trained_with = (run / "config.yaml").read_text()
    with pytest.raises(ResumeMismatchError, match=refusal) as info:
        train(tiny_gpt_config(run, steps=3, data=data, model=model))
    assert "\n" not in str(info.value) and "allow_config_change: [data.path]" in str(info.value)
    assert (run / "config.yaml").read_text() == trained_with  # the refused run's config is not recorded
    with pytest.raises(ConfigError, match=refusal):  # before any rank starts
        preflight(tiny_gpt_config(run, steps=3, data=data, model=model), on_cuda=False)
    allowed = {"allow_config_change": ["data.path"]}
    assert train(tiny_gpt_config(run, steps=3, data=data, model=model, checkpoint=allowed)).start_step == 2
    # an allowed change of data.seq_len changes the sample count by itself: not reported as a replaced dataset
    shorter = tiny_gpt_config(run, steps=3, data={**data, "seq_len": 16}, model=model,
                              checkpoint={"allow_config_change": ["data.seq_len"]})
    preflight(shorter, on_cuda=False)
    assert train(shorter).start_step == 2


def test_a_dataset_re_prepared_from_other_text_with_the_same_sample_count_is_refused(tmp_path):
    """Other text of the same length: the sample count cannot tell, the token digest of the sidecar does. The
    same text prepared again (same digest) resumes."""
    docs, prefix = tmp_path / "docs.jsonl", str(tmp_path / "ds")

    def prepare(words):
        docs.write_text("\n".join(json.dumps({"text": t * 40}) for t in words))
        for suffix in (".bin", ".idx", ".meta.json"):
            Path(prefix + suffix).unlink(missing_ok=True)
        return prepare_indexed([docs], prefix)

    first = prepare(("alpha ", "beta gamma ", "delta\n"))
    data, model, run = {"source": "indexed", "path": prefix, "seq_len": 32}, {"vocab_size": 257}, tmp_path / "run"
    train(tiny_gpt_config(run, steps=2, data=data, model=model, checkpoint={"at_end": True}))
    again = prepare(("alpha ", "beta gamma ", "delta\n"))
    assert again["digest"] == first["digest"] and first["digest"].startswith("xxh3_64:")
    preflight(tiny_gpt_config(run, steps=3, data=data, model=model), on_cuda=False)
    other = prepare(("omega ", "beta delta ", "gamma\n"))
    assert other["tokens"] == first["tokens"] and other["digest"] != first["digest"]
    refusal = (rf"step_{{}} was trained on data.path .*ds with token digest {first['digest']}, it now holds "
               rf"{other['digest']}: the dataset was re-prepared or replaced")
    with pytest.raises(ConfigError, match=refusal.format(2)):  # before any rank starts
        preflight(tiny_gpt_config(run, steps=4, data=data, model=model), on_cuda=False)
    prepare(("alpha ", "beta gamma ", "delta\n"))
    assert train(tiny_gpt_config(run, steps=3, data=data, model=model, checkpoint={"at_end": True})).start_step == 2
    prepare(("omega ", "beta delta ", "gamma\n"))
    with pytest.raises(ResumeMismatchError, match=refusal.format(3)) as info:
        train(tiny_gpt_config(run, steps=4, data=data, model=model))
    assert "\n" not in str(info.value) and "allow_config_change: [data.path]" in str(info.value)
    allowed = {"allow_config_change": ["data.path"]}
    assert train(tiny_gpt_config(run, steps=4, data=data, model=model, checkpoint=allowed)).start_step == 3


def test_a_dataset_built_elsewhere_and_re_shuffled_is_refused_by_its_fingerprint(tmp_path):
    """No sidecar (a Megatron-LM dataset): the same documents in another order keep the sample count, so only
    the sampled fingerprint (data/fingerprint.py) can tell. The files restored resume; a sidecar added later
    (a whole-stream digest, another kind) is not compared with the recorded fingerprint."""
    docs, prefix = tmp_path / "docs.jsonl", str(tmp_path / "ds")

    def build(words, sidecar=False):
        docs.write_text("\n".join(json.dumps({"text": t * 40}) for t in words))
        for suffix in (".bin", ".idx", ".meta.json"):
            Path(prefix + suffix).unlink(missing_ok=True)
        info = prepare_indexed([docs], prefix)
        if not sidecar:
            Path(prefix + ".meta.json").unlink()
        return info

    words = ("alpha ", "beta gamma ", "delta\n")
    first = build(words)
    data, model, run = {"source": "indexed", "path": prefix, "seq_len": 32}, {"vocab_size": 257}, tmp_path / "run"
    train(tiny_gpt_config(run, steps=2, data=data, model=model, checkpoint={"at_end": True}))
    recorded = json.loads((run / "checkpoints" / "step_2" / "train_state.json").read_text())["extra"]["train_digest"]
    assert recorded == dataset_fingerprint(prefix) and recorded.startswith("xxh3_64-sampled:")
    shuffled = build(words[::-1])
    assert shuffled["tokens"] == first["tokens"] and dataset_fingerprint(prefix) != recorded
    refusal = rf"step_2 was trained on data.path .*ds with token digest {recorded}, it now holds xxh3_64-sampled:"
    with pytest.raises(ConfigError, match=refusal):  # before any rank starts
        preflight(tiny_gpt_config(run, steps=3, data=data, model=model), on_cuda=False)
    with pytest.raises(ResumeMismatchError, match=refusal):
        train(tiny_gpt_config(run, steps=3, data=data, model=model))
    build(words)
    assert train(tiny_gpt_config(run, steps=3, data=data, model=model, checkpoint={"at_end": True})).start_step == 2
    build(words, sidecar=True)
    preflight(tiny_gpt_config(run, steps=4, data=data, model=model), on_cuda=False)
    assert train(tiny_gpt_config(run, steps=4, data=data, model=model)).start_step == 3


def test_fingerprint_sees_size_content_and_index_and_reads_a_bounded_amount(tmp_path):
    prefix = tmp_path / "ds"
    body = bytearray(np.random.default_rng(0).integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes())
    Path(f"{prefix}.idx").write_bytes(b"index")
    Path(f"{prefix}.bin").write_bytes(body)
    base = dataset_fingerprint(prefix)
    assert base == dataset_fingerprint(prefix) and base.startswith("xxh3_64-sampled:")
    body[-1] ^= 1  # the last block is always sampled
    Path(f"{prefix}.bin").write_bytes(body)
    assert dataset_fingerprint(prefix) != base
    body[-1] ^= 1
    Path(f"{prefix}.bin").write_bytes(body + b"\0\0")
    assert dataset_fingerprint(prefix) != base  # the size
    Path(f"{prefix}.bin").write_bytes(body)
    Path(f"{prefix}.idx").write_bytes(b"indey")
    assert dataset_fingerprint(prefix) != base
    Path(f"{prefix}.idx").unlink()
    assert dataset_fingerprint(prefix) is None
    assert digest_kind("xxh3_64:ab") == "xxh3_64" and digest_kind(base) == "xxh3_64-sampled"
    big = tmp_path / "big"
    with open(f"{big}.bin", "wb") as f:
        f.truncate(256 * 2**20)
    Path(f"{big}.idx").write_bytes(b"index")
    before = _bytes_read()
    dataset_fingerprint(big)
    assert _bytes_read() - before < 2 * SAMPLES * BLOCK + 2**20  # 2 MiB of a 256 MiB dataset


def test_the_pre_flight_fingerprints_each_dataset_built_elsewhere_once(tmp_path, monkeypatch):
    """data.path and data.valid_path without sidecars, validation on, a checkpoint to resume: the same-data check, the
    held-out overlap check (its document hash files) and the resume check each need a dataset's identity, its sampled
    fingerprint here (2 MiB read per dataset, cold on a network file system); the pre-flight reads each dataset's once.
    """
    docs, prefix, held = tmp_path / "docs.jsonl", tmp_path / "data" / "ds", tmp_path / "data" / "held"
    _prepare_docs(docs, prefix, ("alpha ", "beta gamma ", "delta\n"))
    _prepare_docs(docs, held, ("omega ", "psi chi ", "zeta\n"))
    for p in (prefix, held):
        Path(f"{p}.meta.json").unlink()  # built elsewhere (Megatron-LM's tools)
    data, model = {"source": "indexed", "path": str(prefix), "valid_path": str(held), "seq_len": 32}, {"vocab_size": 257}
    run, validation = tmp_path / "run", {"eval_every": 2, "eval_steps": 1}
    train(tiny_gpt_config(run, steps=2, data=data, model=model, train=validation, checkpoint={"at_end": True}))
    read: list[str] = []
    hash_file = fingerprint._hash_file

    def counted(h, path: Path) -> None:
        read.append(path.name)
        hash_file(h, path)

    monkeypatch.setattr(fingerprint, "_hash_file", counted)
    preflight(tiny_gpt_config(run, steps=3, data=data, model=model, train=validation), on_cuda=False)
    assert sorted(read) == ["ds.bin", "ds.idx", "held.bin", "held.idx"], read


def _train_with_rank_1_reading_another_dataset(rank: int, world: int, run_dir: str, prefix: str) -> tuple[str, int]:
    """Rank 1 reads the dataset as if it had been replaced after rank 0 read it (its fingerprint then differs): the
    one line each rank's train() raises; then, reading it as it is, the steps a run in another directory trains."""
    real = datasets.training_identity
    datasets.training_identity = lambda cfg: (real(cfg)[0] + ("-replaced" if rank == 1 else ""), real(cfg)[1])
    data = {"source": "indexed", "path": prefix, "seq_len": 32}
    said = "trained"
    try:
        train(tiny_gpt_config(run_dir, steps=1, data=data, model={"vocab_size": 257}, parallel={"dp": 2}))
    except ValueError as e:
        said = str(e)
    datasets.training_identity = real
    res = train(tiny_gpt_config(f"{run_dir}_ok", steps=1, data=data, model={"vocab_size": 257}, parallel={"dp": 2}))
    return said, len(res.losses)


@pytest.mark.slow  # ~6 s: a 2-rank training start
def test_ranks_that_read_different_datasets_at_data_path_are_refused_alike(tmp_path):
    """The pre-flight fingerprints data.path once and passes the ranks nothing; each rank reads the dataset's identity
    itself. A dataset replaced while the ranks start (between two ranks' reads) left them training on different
    tokens without a word, the checkpoint recording rank 0's identity; now every rank refuses with the same line
    (and ranks that agree train)."""
    docs, prefix = tmp_path / "docs.jsonl", tmp_path / "data" / "ds"
    _prepare_docs(docs, prefix, ("alpha ", "beta gamma ", "delta\n"))
    Path(f"{prefix}.meta.json").unlink()  # built elsewhere: its identity is the sampled fingerprint
    results = run_ranks(_train_with_rank_1_reading_another_dataset, 2, args=(str(tmp_path / "run"), str(prefix)))
    said = [r[0] for r in results]
    assert [r[1] for r in results] == [1, 1]  # the same dataset on both ranks trains
    assert said[0] == said[1] and "\n" not in said[0], said
    assert said[0].startswith(f"data.path = {prefix} changed while the ranks started: rank 0 read token digest "
                              "xxh3_64-sampled:") and "-replaced" in said[0], said[0]
    assert not list((tmp_path / "run").rglob("step_*")), list((tmp_path / "run").rglob("*"))


def _bytes_read() -> int:
    """This process's bytes read through read(2) so far (Linux /proc/self/io ``rchar``)."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["rchar"])


def _prepare_docs(docs: Path, prefix: Path, texts: tuple[str, ...]) -> None:
    """``texts`` (each repeated 40 times) as the documents of ``docs`` (JSONL), prepared into ``prefix``."""
    prefix.parent.mkdir(exist_ok=True)
    docs.write_text("\n".join(json.dumps({"text": t * 40}) for t in texts))
    prepare_indexed([docs], str(prefix))


@pytest.mark.parametrize("how", ["moved", "prepared_again_after_an_older_sidecar"])
def test_a_dataset_moved_to_another_path_resumes_and_other_text_there_is_refused(tmp_path, how):
    """The same prepared files under a new data.path (moved to local disk, say): the token digest the checkpoint
    recorded proves it is the text the run trained on, so the resume goes ahead without allow_config_change.
    Other text at the new path is still a data.path change, refused in one line. prepared_again_after_an_older_sidecar:
    a run on a dataset whose sidecar records no digest (prepared before digests, as the demo's data_cache) records the
    sampled fingerprint; the same text prepared again elsewhere has a sidecar digest, a digest of the other kind, and
    the resume was refused as a data.path change though the files are byte-identical: the new dataset's sampled
    fingerprint is compared instead."""
    docs, old, new, texts = tmp_path / "docs.jsonl", tmp_path / "old" / "ds", tmp_path / "new" / "ds", (
        "alpha ", "beta gamma ", "delta\n")
    _prepare_docs(docs, old, texts)
    if how != "moved":
        sidecar = Path(f"{old}.meta.json")
        sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items()
                                       if k not in ("digest", "tokenizer_fingerprint")}))  # an older version's sidecar
    model, run = {"vocab_size": 257}, tmp_path / "run"
    data = {"source": "indexed", "path": str(old), "seq_len": 32}
    train(tiny_gpt_config(run, steps=2, data=data, model=model, checkpoint={"at_end": True}))
    if how == "moved":
        shutil.move(str(old.parent), str(new.parent))
    else:
        _prepare_docs(docs, new, texts)
    moved = tiny_gpt_config(run, steps=3, data={**data, "path": str(new)}, model=model, checkpoint={"at_end": True})
    preflight(moved, on_cuda=False)
    assert train(moved).start_step == 2
    _prepare_docs(docs, tmp_path / "other" / "ds", ("omega ", "beta delta ", "gamma\n"))
    other = tiny_gpt_config(run, steps=4, data={**data, "path": str(tmp_path / "other" / "ds")}, model=model)
    refusal = r"data.path '.*new/ds' -> '.*other/ds'; resume refused"
    with pytest.raises(ConfigError, match=refusal):
        preflight(other, on_cuda=False)
    with pytest.raises(ResumeMismatchError, match=refusal):
        train(other)


def test_weather_data_replaced_at_the_same_path_is_refused(tmp_path):
    """The Swin's weather directory re-prepared with more time steps: another sample count, another order."""
    run, weather = tmp_path / "run", tmp_path / "weather"
    train(tiny_swin_config(run, weather, steps=2, checkpoint={"at_end": True}))
    shutil.rmtree(weather)
    more = {"source": "weather", "path": str(weather), "image": [10, 16], "channels": 2, "steps": 16}
    with pytest.raises(ResumeMismatchError, match=r"step_2 was trained on 11 samples of data.path .*weather, it now "
                                                  r"has 15: the dataset was re-prepared or replaced"):
        train(tiny_swin_config(run, weather, steps=3, data=more))


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file under ``run`` and its bytes (directories as None)."""
    return {str(p.relative_to(run)): (p.read_bytes() if p.is_file() else None) for p in sorted(run.rglob("*"))}


@pytest.mark.parametrize("refusal", ["tensor_table", "model_config"])
def test_a_resume_refused_in_the_trainer_leaves_the_run_directory_as_it_found_it(tmp_path, refusal):
    """A resume the pre-flight cannot judge (the tensor table: preflight compares configs only) or that skipped it
    (train() called directly) is refused by the ranks: by then nothing of the run may be rewritten — config.yaml
    (the config the checkpoints were trained with), metrics.jsonl (steps after the checkpoint), summary.json, the
    checkpoints. Only the logs grow (they say why it stopped) and the lock files, empty, are opened."""
    run = tmp_path / "run"
    train(tiny_gpt_config(run, steps=3, checkpoint={"every": 2}, train={"trackers": ["jsonl", "tensorboard"]}))
    model = {}
    if refusal == "tensor_table":  # equal config, a checkpoint whose table no longer matches the model
        ckpt = run / "checkpoints" / "step_2"
        body = read_manifest(ckpt)
        body["tensors"]["model.norm.weight"]["shape"] = [31]
        write_manifest(ckpt, body)
        words = "model.norm.weight saved [31], model [32]"
    else:
        model, words = {"norm_eps": 1e-6}, "model.norm_eps 1e-05 -> 1e-06"
    before = _snapshot(run)
    assert "metrics.jsonl" in before and "config.yaml" in before and "summary.json" in before
    with pytest.raises(ResumeMismatchError, match=re.escape(words)):
        train(tiny_gpt_config(run, steps=5, checkpoint={"every": 2}, model=model, train={"lr": 5e-3}))
    after = _snapshot(run)
    for name, content in before.items():
        if name.startswith("logs/"):
            assert after[name].startswith(content), name
        else:
            assert after.get(name) == content, name
    assert set(after) == set(before), set(after) ^ set(before)


def test_packed_document_switches_changed_on_resume_are_named_old_to_new(tmp_path, capsys):
    """data.document_mask / reset_positions / eod_mask_loss / eod_id change the attention mask, the RoPE positions
    and the loss mask the same weights train under, not the weights nor which samples consumed_samples points at
    (the samples are the same seq_len chunks): a legitimate switch from the resume step (Megatron-LM allows it), so
    applied — and named, each with both values, in the one line of such differences."""
    run = tmp_path / "run"
    train(tiny_gpt_config(run, steps=2, checkpoint={"at_end": True}))  # an eod_id without a document option is refused
    capsys.readouterr()
    on = {"eod_id": 6, "document_mask": True, "reset_positions": True, "eod_mask_loss": True}
    res = train(tiny_gpt_config(run, steps=3, data=on))
    assert res.start_step == 2 and len(res.losses) == 1
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume: ")]
    named = [line for line in said if "data." in line]
    assert len(named) == 1, said
    for key, old, new in (("document_mask", False, True), ("reset_positions", False, True),
                          ("eod_mask_loss", False, True), ("eod_id", None, 6)):
        assert f"data.{key} {old!r} -> {new!r}" in named[0], named
    assert named[0].endswith("(differ from the checkpoint): as configured now from step 3 on"), named


def test_a_start_that_fails_after_the_resume_accepted_leaves_config_and_metrics_alone(tmp_path):
    """The resume accepted the config, then the start failed building the held-out data (data.valid_path missing;
    the pre-flight says so first, train() here goes without it): config.yaml must still be the config the
    checkpoints were trained with (it was rewritten with one that never trained a step), metrics.jsonl untouched."""
    docs, prefix = tmp_path / "docs.jsonl", str(tmp_path / "ds")
    docs.write_text("\n".join(json.dumps({"text": t * 40}) for t in ("alpha ", "beta ", "gamma ")))
    prepare_indexed([docs], prefix)
    data, model, run = {"source": "indexed", "path": prefix, "seq_len": 32}, {"vocab_size": 257}, tmp_path / "run"
    train(tiny_gpt_config(run, steps=2, data=data, model=model, checkpoint={"at_end": True}))
    before = _snapshot(run)
    with pytest.raises(ValueError, match="missing.bin/.idx not found"):
        train(tiny_gpt_config(run, steps=4, data={**data, "valid_path": str(tmp_path / "missing")}, model=model,
                              train={"eval_every": 1, "lr": 5e-3}))
    after = _snapshot(run)
    assert after["config.yaml"] == before["config.yaml"] and after["metrics.jsonl"] == before["metrics.jsonl"]


def test_a_restart_before_the_first_save_starts_from_what_checkpoint_resume_names(tmp_path):
    """The launchers restart a job (and every batch-job start) with checkpoint.restart=true; they set
    checkpoint.resume=auto, which discarded a configured checkpoint.resume PATH (an HF import, another run's step):
    a fine-tune that crashed before its first save restarted from random weights at step 0 (measured with `dist-train
    launch --max-restarts 1`: 'restarting the job from the last committed checkpoint', then step 1/8 from scratch).
    Now: the run's own newest checkpoint once it has one, else what checkpoint.resume names."""
    init = tmp_path / "init"
    straight = train(tiny_gpt_config(init, steps=5, checkpoint={"every": 3}))
    src = str(init / "checkpoints" / "step_3")
    run = tmp_path / "finetune"
    cfg = tiny_gpt_config(run, steps=5, checkpoint={"resume": src, "restart": True, "at_end": True})
    preflight(cfg, on_cuda=False)
    first = train(cfg)  # a restart before this run saved anything: from the configured checkpoint
    assert first.start_step == 3 and rel_close(first.losses, straight.losses[3:], 1e-6), (first.losses, straight.losses)
    again = tiny_gpt_config(run, steps=6, checkpoint={"resume": src, "restart": True, "at_end": True})
    preflight(again, on_cuda=False)  # the run's own step_5 is newer than src: no "holds newer checkpoints" refusal
    assert train(again).start_step == 5
