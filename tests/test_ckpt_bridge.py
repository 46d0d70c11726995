"""Stock torch formats: `ckpt convert --to dcp|torch` read by stock dcp.load / dcp_to_torch_save /
torch.load (GPT and Swin), `--from dcp` then resume, foreign checkpoints named by resume and inspect/verify
(one line, exit 2 before any rank), and a closed stdout pipe ends a command quietly."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dist_train.checkpoint.manager import CheckpointManager, checkpoint_extra
from dist_train.cli import main
from dist_train.config import CheckpointConfig, save_config
from dist_train.data.datasets import SyntheticTokenDataset
from dist_train.data.image_batches import NORMALISATION_KEY
from dist_train.models.gpt import GPT
from dist_train.models.swin import build_swin
from dist_train.trainer import train
from tests.trainer_utils import run_cli, tiny_gpt_config, tiny_swin_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(kind: str, tmp_path):
    torch.manual_seed(4)
    if kind == "gpt":
        cfg = tiny_gpt_config(tmp_path / "run", train={"peak_tflops": 1.0})  # no CPU calibration
        return GPT(cfg.model, init_seed=17), cfg
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "weather")
    return build_swin(cfg.model, wp_group=None, grid=(1, 1)), cfg


def _zeros_like(model):
    return {k: torch.zeros_like(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["gpt", "swin"])
def test_to_dcp_and_to_torch_are_read_by_stock_torch(kind, tmp_path, capsys):
    model, _ = _model(kind, tmp_path)
    ckpt = _save_ours_simple(model, tmp_path / "ckpts")
    want = model.state_dict()
    assert main(["ckpt", "convert", str(ckpt), "--to", "dcp", str(tmp_path / "stock")]) == 0
    got = _zeros_like(model)
    dcp.load(got, storage_reader=FileSystemReader(str(tmp_path / "stock")))  # stock reader, no dist-train code
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    dcp_to_torch_save(str(tmp_path / "stock"), str(tmp_path / "via_format_utils.pt"))
    flat = torch.load(tmp_path / "via_format_utils.pt", weights_only=True)
    assert flat.keys() == want.keys() and all(torch.equal(flat[k], want[k]) for k in want)
    if kind == "gpt":  # a GPT writes no sidecar: a file of that name there is none of its business
        (tmp_path / "model.pt.input_normalisation.json").write_text("{}")
    assert main(["ckpt", "convert", str(tmp_path / "ckpts"), "--to", "torch", str(tmp_path / "model.pt")]) == 0
    fresh, _ = _model(kind, tmp_path)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert all(torch.equal(a, want[k]) for k, a in fresh.state_dict().items())
    capsys.readouterr()
    # refusing to write into something that exists
    assert main(["ckpt", "convert", str(ckpt), "--to", "dcp", str(tmp_path / "stock")]) == 2
    assert "already exists" in capsys.readouterr().err


def _save_ours_simple(model, root):
    ckpt_cfg = CheckpointConfig(every=0, keep_last=1, async_save=False, resume="none", dir=str(root), on_error="stop")
    mgr = CheckpointManager(ckpt_cfg, run_dir=root, config={"model": {}}, layout={"world_size": 1})
    assert mgr.save(3, model, torch.optim.AdamW(model.parameters()))
    return root / "step_3"


def _first_batch_loss(model: GPT, cfg) -> float:
    data = SyntheticTokenDataset(cfg.model.vocab_size, cfg.data.seq_len, cfg.run.seed)
    seqs = torch.stack([data[i] for i in range(cfg.train.global_batch)])
    with torch.no_grad():
        loss_sum, count = model({"tokens": seqs[:, :-1], "labels": seqs[:, 1:],
                                 "positions": torch.arange(cfg.data.seq_len)})
    return (loss_sum / count).item()


@pytest.mark.parametrize("nested", [False, True])
def test_from_dcp_then_resume_starts_from_those_weights(nested, tmp_path, capsys):
    model, cfg = _model("gpt", tmp_path)  # init_seed 17: not what the run's seed would build
    sd = model.state_dict()
    dcp.save({"model": sd} if nested else sd, checkpoint_id=str(tmp_path / "stock"))
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init"),
                 "--config", str(cfg_file)]) == 0
    assert "checkpoint.resume=" in capsys.readouterr().out
    res = train(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(tmp_path / "init"))))
    assert abs(res.losses[0] - _first_batch_loss(model, cfg)) <= 1e-6 * res.losses[0]
    # a config whose model differs is refused in one line before anything is written
    assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init2"),
                 "--config", str(cfg_file), "--set", "model.d_model=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has shape" in err and not (tmp_path / "init2").exists()



@pytest.mark.slow
def test_foreign_checkpoints_are_named(tmp_path, capsys):
    model, cfg = _model("gpt", tmp_path)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "stock"))
    for action in ("inspect", "verify"):
        assert main(["ckpt", action, str(tmp_path / "stock")]) == 1
        out = capsys.readouterr().out
        assert "NOT A DIST-TRAIN CHECKPOINT" in out and "stock torch.distributed.checkpoint" in out
        assert "--from dcp" in out and "never committed" not in out
    main(["ckpt", "inspect", str(tmp_path / "stock")])
    assert "layers.0.attention.wq.weight" in capsys.readouterr().out  # the stock checkpoint's tensor table
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    assert main(["ckpt", "verify", str(tmp_path / "hf")]) == 1
    assert "Hugging Face model directory" in capsys.readouterr().out
    # resume: auto on a checkpoint directory holding a stock DCP checkpoint (at its root, or as a step_N)
    os.rename(tmp_path / "stock", tmp_path / "ckpts_a")
    (tmp_path / "ckpts_b").mkdir()
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "ckpts_b" / "step_5"))
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    # the first through a real process (exit status, stderr as a user sees them), the second in-process through
    # the same main() (a subprocess costs seconds of imports)
    for i, d in enumerate(("ckpts_a", "ckpts_b")):
        args = ["run", str(cfg_file), "--set", f"checkpoint.dir={tmp_path / d}", "--set", "checkpoint.resume=auto",
                "--set", f"run.dir={tmp_path / 'never'}"]
        if i == 0:
            r = run_cli(*args)
            code, err = r.returncode, r.stderr
        else:
            code, err = main(args), capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "stock torch.distributed.checkpoint" in lines[0], err
        assert not (tmp_path / "never" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_closed_stdout_pipe_ends_quietly(tmp_path):
    model, _ = _model("gpt", tmp_path)
    _save_ours_simple(model, tmp_path / "ckpts")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for args in (["ckpt", "inspect", str(tmp_path / "ckpts")], ["--help"]):
        p = subprocess.Popen([sys.executable, "-m", "dist_train", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
        p.stdout.close()  # the reader is gone before the first line is written (`… | head -0`)
        err = p.stderr.read().decode()
        p.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipe" not in err and err.strip() == "", err
        assert p.returncode in (0, 141), (args, p.returncode)


def test_a_resume_from_an_import_that_records_no_model_config_says_so(tmp_path, capsys):
    """`--from dcp` without --config records no model section: nothing can check the keys that change the
    function without changing a shape (rope_theta, rope_scaling, norm_eps, attention_window), so a resume with
    another rope_theta loaded the weights into another model without a word. It still loads (the documented
    import), and one line names the checkpoint, what cannot be checked and how to record it."""
    model, cfg = _model("gpt", tmp_path)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "stock"))
    assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init")]) == 0
    capsys.readouterr()
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_theta=500000.0),
                                checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(tmp_path / "init")))
    assert train(other).start_step == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "records no model config" in line]
    assert len(said) == 1 and "step_0" in said[0] and "rope_theta" in said[0] and "--config" in said[0], said


def test_a_swin_export_forecasts_with_the_normalisation_its_checkpoint_records(tmp_path, capsys):
    """A Swin's --to torch export is half of a forecast: its inputs were normalised with statistics the state
    dict does not hold, and the model's forward returned only a loss. `ckpt inspect` (and --json) and the
    conversion now name the statistics, and ``forecast`` gives the prediction whose error the loss sums."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "weather", steps=2, data={"split": "75,25,0"},
                           checkpoint={"at_end": True})
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert main(["ckpt", "inspect", str(ckpts), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "\ninputs      normalised per channel as (field - mean) / scale" in out
    assert "\nmodel       swin: d_model 16, n_layers 2, n_heads 2, ffn_hidden 32, patch_size 1, window 4" in out, out
    norm = json.loads((tmp_path / "c.json").read_text())["input_normalisation"]
    assert len(norm["mean"]) == len(norm["scale"]) == 2
    assert main(["ckpt", "convert", str(ckpts), "--to", "torch", str(tmp_path / "m.pt")]) == 0
    err = capsys.readouterr().err
    assert "inputs normalised per channel" in err and "#using-an-exported-swin" in err, err
    model = build_swin(cfg.model, wp_group=None, grid=(1, 1)).eval()
    model.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    mean, scale = (torch.tensor(norm[k]) for k in ("mean", "scale"))
    fields = torch.from_numpy(np.load(tmp_path / "weather" / "fields.npy"))
    x, y = ((fields[t] - mean) / scale for t in (9, 10))
    with torch.no_grad():
        pred = model.forecast(x[None])
        loss_sum, count = model({"x": x[None], "y": y[None], "image_size": (10, 16)})
    assert pred.shape == (1, 10, 16, 2) and count == pred.numel()
    assert torch.equal(((pred - y[None]) ** 2).sum(), loss_sum)


def _norm_of(ckpt_dir) -> dict:
    """The input normalisation the newest checkpoint under ``ckpt_dir`` records (None: none)."""
    return checkpoint_extra(max(Path(ckpt_dir).glob("step_*"), key=lambda p: int(p.name[5:]))).get(NORMALISATION_KEY)


def _said(out: str, what: str) -> list[str]:
    return [line for line in out.splitlines() if what in line]


def test_a_swin_keeps_its_normalisation_through_an_export_and_import_onto_other_fields(tmp_path, capsys):
    """`--to dcp` then `--from dcp` of a Swin recorded no input normalisation, and a run from the import on other
    fields normalised with those fields' statistics: the weights silently paired with other input units. The export
    now writes them beside itself (`--to dcp`: inside the directory; `--to torch`: FILE.input_normalisation.json),
    the import records them, and the run keeps them and says so in one line, as a run from the native checkpoint
    on those fields (an allowed data change) does."""
    trained = tiny_swin_config(tmp_path / "run", tmp_path / "w", steps=2, data={"split": "75,25,0"},
                               checkpoint={"at_end": True})
    train(trained)
    native = _norm_of(tmp_path / "run" / "checkpoints")
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert main(["ckpt", "convert", ckpts, "--to", "dcp", str(tmp_path / "stock")]) == 0
    assert main(["ckpt", "convert", ckpts, "--to", "torch", str(tmp_path / "m.pt")]) == 0
    for sidecar in (tmp_path / "stock" / "input_normalisation.json", tmp_path / "m.pt.input_normalisation.json"):
        assert json.loads(sidecar.read_text()) == {NORMALISATION_KEY: native}
    assert "written to" in capsys.readouterr().err
    cfg_file = tmp_path / "cfg.yaml"
    save_config(trained, cfg_file)
    assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init"),
                 "--config", str(cfg_file)]) == 0
    assert _said(capsys.readouterr().out, "recorded the model's inputs normalised")
    assert _norm_of(tmp_path / "init") == native

    def on_other_fields(run: str, resume: Path, steps: int, **checkpoint):
        # other fields: another generation seed at another path; one step past the checkpoint
        return tiny_swin_config(tmp_path / run, tmp_path / "w_other", steps=steps, run={"seed": 5},
                                data={"split": "75,25,0"},
                                checkpoint={"at_end": True, "resume": str(resume), **checkpoint})
    train(on_other_fields("from_import", tmp_path / "init", 1))
    train(on_other_fields("from_native", tmp_path / "run" / "checkpoints", 3,
                          allow_config_change=["data.path", "run.seed"]))
    for run in ("from_import", "from_native"):
        assert _norm_of(tmp_path / run / "checkpoints") == native, run
    said = _said(capsys.readouterr().out, "resume: the inputs are normalised with the statistics")
    mean = "[" + ", ".join(f"{v:.6g}" for v in native["mean"]) + "]"
    assert len(said) == 2 and all(f"trained with (as the checkpoint records; the data changed since), mean {mean}"
                                  in line for line in said), said


def test_a_swin_import_without_its_normalisation_is_refused_unless_told_to_use_the_datas(tmp_path, capsys):
    """A stock DCP Swin without input_normalisation.json (a plain dcp.save, an export of an older version): the
    import is refused in one line naming both ways on, and writes nothing. --input-normalisation-from-data records
    none, and the run from it names the statistics it uses (its data's own). The flag is refused where it means
    nothing: beside a recorded normalisation, and for a GPT."""
    model, cfg = _model("swin", tmp_path)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "stock"))
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    for config in ([], ["--config", str(cfg_file)]):  # a Swin by its config, or by its tensors
        assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init"),
                     *config]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "without input_normalisation.json" in err, err
        assert "ckpt inspect CKPT --json" in err and "--input-normalisation-from-data" in err
        assert not (tmp_path / "init").exists()
    assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init"),
                 "--config", str(cfg_file), "--input-normalisation-from-data"]) == 0
    assert _said(capsys.readouterr().out, "recorded no input normalisation")
    assert _norm_of(tmp_path / "init") is None
    run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1),
                              checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(tmp_path / "init")))
    train(run)
    said = _said(capsys.readouterr().out, "records no input_normalisation")
    assert len(said) == 1 and "this data's own training-share statistics, mean [" in said[0], said

    (tmp_path / "stock" / "input_normalisation.json").write_text(json.dumps({NORMALISATION_KEY: {
        "mean": [0.0, 1.0], "scale": [1.0, 2.0]}}))
    assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init2"),
                 "--input-normalisation-from-data"]) == 2
    assert "records the statistics the model was trained with" in capsys.readouterr().err
    (tmp_path / "stock" / "input_normalisation.json").write_text(json.dumps({NORMALISATION_KEY: {
        "mean": [0.0], "scale": [1.0]}}))
    assert main(["ckpt", "convert", str(tmp_path / "stock"), "--from", "dcp", str(tmp_path / "init2"),
                 "--config", str(cfg_file)]) == 2
    assert "1 means and 1 scales, the model 2 input channels" in capsys.readouterr().err
    gpt, _ = _model("gpt", tmp_path)
    dcp.save(gpt.state_dict(), checkpoint_id=str(tmp_path / "gpt_stock"))
    assert main(["ckpt", "convert", str(tmp_path / "gpt_stock"), "--from", "dcp", str(tmp_path / "init3"),
                 "--input-normalisation-from-data"]) == 2
    assert "not a Swin state dict" in capsys.readouterr().err
