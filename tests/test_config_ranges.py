"""Every config key has a validated range: a table of bad values per key, each refused with one line that
names the key (in process, fast), plus real CLI runs for the exit status, the single line and the fact
that no rank process started."""
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from dist_train.cli import main
from dist_train.config import Config, ConfigError, config_from_dict
from tests.trainer_utils import run_cli, run_cli_here

HUGE = 10**12

#: key -> values that must be refused. A key missing here fails test_every_key_has_bad_values: when you add
#: a config key, give it a range in dist_train/config.py (_BOUNDS, _CHOICES or its section's _validate_*)
#: and a row here.
BAD: dict[str, list] = {
    "run.name": ["", "  ", 3],
    "run.dir": ["", None, 5, "~/runs/x"],  # '~' is not expanded: a folder named '~' here
    "run.seed": [-1, 2**63, "x"],
    "model.kind": ["bert", None],
    "model.d_model": [0, -128, HUGE, 1.5],
    "model.n_layers": [0, -2, HUGE],
    "model.n_heads": [0, -4, HUGE],
    "model.n_kv_heads": [0, -1, "two"],
    "model.ffn_hidden": [0, -64, HUGE],
    "model.vocab_size": [0, 1, -257, 2**40],
    "model.rope_theta": [0, -10000.0, float("nan"), float("inf"), "big"],
    "model.norm_eps": [-1e-5, float("nan"), float("inf")],
    "model.tie_embeddings": ["yes", 1],
    "model.init_std": [-0.02, float("nan")],
    "model.attention_window": [0, -4, 1.5],
    "model.head_dim": [0, -8, 7, HUGE, 2.5],
    "model.rope_scaling": [{"rope_type": "yarn", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0}, "llama3", 5],
    "model.patch_size": [0, -1, HUGE],
    "model.window": [0, -8, [8], [8, 0], [8, 8, 8], "8", True],
    "model.in_channels": [-1, HUGE],
    "model.out_channels": [-1, HUGE],
    "model.wrap": [[True], [1, 0], "no", None],
    "data.source": ["files", None],
    "data.path": ["", 3],
    "data.prepare": ["wikipedia", 1],
    "data.tokenizer": ["", None],
    "data.seq_len": [0, 1, -256, HUGE],
    "data.image": [[256], [0, 512], [256, -1], "256x512"],
    "data.channels": [0, -4],
    "data.steps": [0, 1, -64],
    "data.document_mask": ["yes", 1],
    "data.reset_positions": ["yes", 0],
    "data.eod_mask_loss": ["no", 1],
    "data.eod_id": [-1, 2**40, "eos"],
    "parallel.dp": [0, -1],
    "parallel.tp": [0, -2],
    "parallel.pp": [0, -2],
    "parallel.cp": [0, -2],
    "parallel.wp": [[0, 2], [1, 2, 3], "2x2", [1.5, 2]],
    "parallel.cp_layout": ["spiral"],
    "parallel.cp_method": ["allgather"],
    "parallel.ulysses_degree": [0, -2],
    "parallel.cp_kv_piece": [0, -1024],
    "parallel.zero_stage": [-1, 4, 1.5],
    "parallel.microbatches": [0, -4],
    "parallel.pp_schedule": ["zb"],
    "parallel.sequence_parallel": ["yes", 0],
    "parallel.fsdp": ["yes", 1, True],  # True alone: dp × cp × wp = 1, nothing to shard over
    "parallel.fsdp_reshard_after_forward": ["no", 0],
    "parallel.attn_kernel": ["xformers"],
    "parallel.deepspeed": [[1, 2], "zero3"],
    "train.steps": [0, -1],
    "train.global_batch": [0, -8],
    "train.micro_batch": [0, -4],
    "train.lr": [0, -1e-3, float("nan"), float("inf")],
    "train.min_lr_ratio": [-0.1, 1.5, float("nan")],
    "train.warmup_steps": [-1],
    "train.weight_decay": [-0.1, float("inf")],
    "train.betas": [[0.9], [0.9, 1.0], [-0.1, 0.95], [0.9, 0.95, 0.99], ["a", "b"], 0.9, [True, 0.9]],
    "train.grad_clip": [-1.0, float("nan"), float("inf")],
    "train.precision": ["fp16"],
    "train.log_every": [0, -1],
    "train.activation_checkpointing": ["some"],
    "train.loss_chunk": [0, -2048, "big", 1.5, True, None, HUGE],
    "train.peak_tflops": [0, -1.0, float("inf")],
    "train.exit_interval": [-1],
    "train.progress": ["on"],
    "train.on_nonfinite": ["ignore", None],
    "train.max_nonfinite_steps": [0, -1],
    "train.spike_factor": [1, 0.5, float("inf"), float("nan")],
    "train.spike_window": [0, -3],
    "train.trackers": ["tensorboard", ["csv"], ["jsonl", "jsonl"]],
    "train.eval_every": [-1, "often"],
    "train.eval_steps": [0, -2],
    "train.gc_interval": [-1, 1.5, "often", True],
    "data.split": ["a,b", "-1,2", "0,0,0", "1,2,3,4"],
    "data.valid_path": ["", 3],
    "data.valid_overlap_max": [-0.1, 1.5, float("nan"), "some", None],
    "data.valid_overlap_min_tokens": [0, -1, 1.5, "x", None],
    "checkpoint.every": [-1],
    "checkpoint.keep_last": [0, -3],
    "checkpoint.async_save": ["yes"],
    "checkpoint.resume": ["", None],
    "checkpoint.dir": ["", 7, "~"],
    "checkpoint.at_end": ["no"],
    "checkpoint.restart": ["yes"],
    "checkpoint.on_error": ["ignore"],
    "checkpoint.allow_config_change": [["model.nope"], ["train.lr"], "model.rope_theta", [3]],
    "launch.backend": ["slurm"],
    "launch.nproc": [0, -2],
    "launch.address": ["", 6379],
    "launch.nodes": [0, -1],
    "launch.gpus_per_node": [-1],
    "launch.max_restarts": [-1],
    "launch.collective_timeout_s": [0, -5.0, float("nan"), float("inf")],
    "launch.watchdog_s": [-1.0, float("nan"), float("inf")],
    "launch.bind": ["", 8],
    "launch.placement_timeout_s": [0, -1.0, float("nan"), float("inf")],
    "profile.steps": [[0, 2], [-1, 2], [3, 2], [1], [1, 2, 3], "1-2", [1, 31], [True, 2], [1.5, 2]],  # train.steps 30
    "profile.ranks": [[-1], [0, 0], [], "0", [True]],
    "profile.memory": ["yes", 1, True],  # True alone: profile.steps is null, nothing is profiled
    "profile.record_shapes": ["yes", 1, True],
    "profile.with_stack": ["yes", 0, True],
}


def _all_keys() -> set[str]:
    cfg = Config()
    return {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, s.name))}


def test_every_key_has_bad_values():
    missing = sorted(_all_keys() - set(BAD))
    assert not missing, (f"config keys without a bad-value row: {missing}; give each a range in "
                         "dist_train/config.py and a row in tests/test_config_ranges.py BAD")
    assert not set(BAD) - _all_keys(), sorted(set(BAD) - _all_keys())


@pytest.mark.parametrize("key, value", [(k, v) for k, vs in BAD.items() for v in vs],
                         ids=lambda x: repr(x)[:24])
def test_bad_value_is_one_line_naming_the_key_and_the_valid_range(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as e:
        config_from_dict({section: {name: value}})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(key) or f" {key} " in msg or f"'{key}'" in msg, msg


@pytest.mark.parametrize("key, value, text", [
    ("model.rope_theta", 0, "model.rope_theta = 0.0: must be > 0 and finite"),
    ("train.min_lr_ratio", 1.5, "train.min_lr_ratio = 1.5: must be in [0, 1]"),
    ("model.n_kv_heads", 0, "model.n_kv_heads = 0: must be in [1, 131072] (or null: = n_heads)"),
    ("train.betas", [0.9, 1.0], "train.betas = [0.9, 1.0]: expected two numbers in [0, 1)"),
    ("launch.watchdog_s", -1, "launch.watchdog_s = -1.0: must be >= 0 and finite"),
])
def test_message_quotes_the_valid_range(key, value, text):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=None) as e:
        config_from_dict({section: {name: value}})
    assert text in str(e.value), str(e.value)


@pytest.mark.parametrize("value, folder, suggestion", [
    ("~/runs/x", "'~'", os.path.expanduser("~/runs/x")),
    ("~nosuchuser_dt/x", "'~nosuchuser_dt'", "no home of a user nosuchuser_dt"),
])
def test_a_leading_tilde_names_the_folder_it_would_create_and_the_path_to_write(value, folder, suggestion):
    """`~user/x` would create a folder named `~user` (not `~`), and for an unknown user expanduser gives the value
    back: the line then suggested the refused value itself."""
    with pytest.raises(ConfigError) as e:
        config_from_dict({"run": {"dir": value}})
    msg = str(e.value)
    assert f"a folder named {folder}" in msg and suggestion in msg, msg


def test_null_keeps_its_documented_meaning():
    cfg = config_from_dict({"model": {"n_kv_heads": None, "ffn_hidden": None, "attention_window": None},
                            "train": {"peak_tflops": None, "grad_clip": 0, "exit_interval": 0}})
    assert cfg.model.n_kv_heads is None and cfg.train.grad_clip == 0.0



def test_cli_refuses_before_any_rank_starts(tmp_path, capsys):
    """A few real commands: exit 2, exactly one line on stderr, and no run directory (no rank ever ran). `run` and
    `plan` as processes of their own (stderr as a user sees it, interpreter start included); the two `launch` cases
    in this process (a launcher process cost ~5 s of CPU importing torch and the launchers; a `launch` process's
    refusal is one line in tests/test_launch_e2e.py::test_ray_address_with_token_auth)."""
    run_dir = tmp_path / "run"
    in_process = [
        ["launch", "configs/gpt_tiny.yaml", "--backend", "local", "--set", f"run.dir={run_dir}",
         "--set", "train.betas=[0.9, 1.5]"],
        ["launch", "configs/gpt_tiny.yaml", "--backend", "local", "--set", f"run.dir={run_dir}",
         "--set", "profile.steps=[29, 31]"],  # a profiled window past the run's last step
    ]
    processes = [
        ["run", "configs/gpt_tiny.yaml", "--set", f"run.dir={run_dir}", "--set", "parallel.dp=1",
         "--set", "model.n_heads=0"],
        ["plan", "configs/gpt_tiny.yaml", "--devices", "0"],
    ]
    with ThreadPoolExecutor(len(processes)) as pool:  # two interpreters start at once: their imports overlap
        started = pool.map(lambda args: run_cli(*args), processes)
        said = [run_cli_here(capsys, *args) for args in in_process]
        results = list(started)
    for args, r in zip(in_process + processes, said + results):
        assert r.returncode == 2, (args, r.returncode, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dist-train"), (args, r.stderr[-2000:])
        assert not run_dir.exists(), args
    assert said[-1].stderr.strip().endswith("profile.steps = [29, 31]: step 31 is after the run's last step "
                                        "(train.steps = 30); trace steps within 1..30"), said[-1].stderr


@pytest.mark.parametrize("argv", [[], ["bogus"], ["launch"], ["run"], ["plan", "c.yaml", "--devices", "0"],
                                  ["plan", "c.yaml", "--top", "x"], ["ckpt", "verify"], ["data", "prepare"],
                                  ["launch", "c.yaml", "--backend", "slurm"], ["bench", "attention", "--seq-len", "x"]],
                         ids=lambda a: " ".join(a) or "none")
def test_argument_errors_are_one_line_with_a_help_hint(argv, capsys):
    """In process: argparse errors of every command are one line pointing at --help, not the usage text."""

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dist-train") and err[0].endswith("--help)"), err
