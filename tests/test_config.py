"""Config parsing, overrides and validation; the CLI's bad-input contract (one line, exit 2)."""
import dataclasses
import subprocess
import sys

from pathlib import Path

import pytest

from dist_train.cli import _COMMANDS, _bench_modules, main
from dist_train.config import ConfigError, ModelConfig, check_world_size, config_from_dict, load_config
from tests.trainer_utils import run_cli, tiny_gpt_config, tiny_swin_config


def test_overrides_are_yaml_scalars_and_refs_expand(tmp_path):
    cfg = load_config("configs/gpt_tiny.yaml", ["parallel.cp=2", "train.lr=1e-3", "run.name=x",
                                                "model.n_kv_heads=null"])
    assert cfg.parallel.cp == 2 and cfg.train.lr == 1e-3 and cfg.run.dir == "runs/x"
    assert cfg.model.n_kv_heads is None
    with pytest.raises(ConfigError, match="window parallelism needs model.kind = swin"):
        load_config("configs/gpt_tiny.yaml", ["parallel.wp=[1, 2]"])  # validated: gpt cannot use wp


@pytest.mark.parametrize("data, msg", [
    ({"train": {"stepz": 3}}, "unknown config key 'train.stepz' (did you mean train.steps?); valid keys in train: "
                              "steps, global_batch"),
    ({"modle": {}}, "unknown config key 'modle' (did you mean model?); valid keys: run, model, data"),
    ({"train": {"seq_len": 64}}, "unknown config key 'train.seq_len' (it is data.seq_len); valid keys in train:"),
    ({"parallel": {"steps": 3}},
     "unknown config key 'parallel.steps' (it is data.steps or train.steps or profile.steps); valid"),
    ({"parallel": {"zero": 1}}, "unknown config key 'parallel.zero'; valid keys in parallel: dp, tp"),  # no guess
    ({"train": {"steps": "many"}}, "train.steps = 'many': expected int"),
    ({"parallel": {"cp_layout": "spiral"}}, "parallel.cp_layout = 'spiral': valid values are contiguous, striped, zigzag"),
    ({"train": {"global_batch": 6, "micro_batch": 4}}, "train.global_batch = 6 is not a multiple of micro_batch * dp = 4 * 1 = 4"),
    ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "model.n_heads = 4 is not divisible by model.n_kv_heads = 3"),
    ({"model": {"n_layers": 1}, "parallel": {"pp": 2}}, "model.n_layers = 1 < 2 pipeline stages (pp = 2, schedule 1f1b)"),
    ({"parallel": {"tp": 3}}, "model.n_heads = 4 is not divisible by parallel.tp = 3"),
    ({"parallel": {"cp_kv_piece": 0}}, "parallel.cp_kv_piece = 0: must be >= 1 (or null: whole shards)"),
])
def test_invalid_configs_name_the_key_and_numbers(data, msg):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_world_size_mismatch_names_the_product():
    cfg = config_from_dict({"parallel": {"dp": 2, "cp": 3}})
    with pytest.raises(ConfigError, match=r"dp\*tp\*pp\*cp\*wp = 2\*1\*1\*3\*1 = 6 but 4 ranks were launched"):
        check_world_size(cfg, 4)
    check_world_size(cfg, 6)



def test_cli_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run: {name: [unclosed\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text(Path("configs/gpt_tiny.yaml").read_text().replace("  n_heads: 4\n", "  n_heads: 4\n  n_heads: 8\n"))
    cases = [
        (["run", "configs/gpt_tiny.yaml", "--set", "train.stepz=3"], {}, "unknown config key 'train.stepz'"),
        (["run", str(bad_yaml)], {}, "is not valid YAML"),
        (["run", str(twice)], {}, "key 'n_heads' is given twice in one mapping (lines "),
        (["run", "configs/gpt_tiny.yaml", "--set", "parallel.cp=2"], {},
         "= 4 but 1 ranks were launched: `dist-train run` without a launcher is one process; for one rank pass "
         "--set parallel.dp=1 --set parallel.cp=1, or start 4 ranks: dist-train launch CONFIG, torchrun"),
        (["run", "configs/gpt_tiny.yaml", "--set", "parallel.dp=3", "--set", "train.global_batch=12"], {"WORLD_SIZE": "2"},
         "dp*tp*pp*cp*wp = 3*1*1*1*1 = 3 but 2 ranks were launched"),
        (["run", "configs/gpt_tiny.yaml", "--set", f"data.path={tmp_path}/nope", "--set", "data.prepare=null", "--set", "parallel.dp=1",
          "--set", f"run.dir={tmp_path}/r"], {}, f"data.path = {tmp_path}/nope"),
        (["run", str(tmp_path / "missing.yaml")], {}, "not found"),
        (["launch", "configs/gpt_tiny.yaml", "--set", "parallel.microbatches=4"], {},
         "parallel.microbatches = 4: only the pipeline engine reads it and parallel.pp = 1"),
    ]
    # the first through a real process (python -m dist_train: exit status, stderr); the rest in-process
    # through the same main() (a subprocess costs seconds of imports each)
    for i, (args, env, needle) in enumerate(cases):
        if i == 0:
            r = run_cli(*args, env_extra=env)
            code, err = r.returncode, r.stderr
        else:
            with monkeypatch.context() as m:
                for k, v in env.items():
                    m.setenv(k, v)
                code = main(args)
            err = capsys.readouterr().err
        assert code == 2, (args, code, err[-2000:])
        lines = [l for l in err.splitlines() if l.startswith("dist-train: error:")]
        assert len(lines) == 1 and needle in lines[0], (needle, err[-2000:])
        assert "Traceback" not in err


def test_every_subcommand_has_help_with_an_example(capsys):
    """In-process (subprocesses would cost seconds each): every command and bench subcommand."""
    commands = [[c] for c in _COMMANDS] + [["data", "prepare"]]
    commands += [["bench", b] for b in _bench_modules()] + [["ckpt", a] for a in ("inspect", "verify", "convert")]
    for cmd in [[]] + commands:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "example" in out.lower(), (cmd, out[-500:])
        # the usage, then a line saying what the command does
        assert cmd == [] or out.split("\n\n")[1][:1].isupper(), (cmd, out[:500])


def test_top_level_help_imports_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys; from dist_train.cli import main\n"
                        "try:\n    main(['--help'])\nexcept SystemExit: pass\n"
                        "assert 'torch' not in sys.modules, 'dist-train --help imported torch'"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


# one argument per bench command that its torch-free check refuses (a new command must add one)
_BENCH_REFUSALS = {"attention": ["--repeats", "0"], "memory": ["--cp", "0"], "window": ["--image", "10", "16"],
                   "ckpt": ["--size-gb", "0"], "train": ["configs/gpt_tiny.yaml", "--repeats", "3"],
                   "launch": ["configs/gpt_tiny.yaml", "--backends", "foo"], "overlap": ["--overlap", "1.5"]}


def test_bench_parser_help_and_refusals_import_no_torch():
    """Importing the CLI, building the `bench` parser, `--help` of every bench command and an argument each one
    refuses (exit 2) load neither torch nor any measuring module dist_train.bench.NAME: only a command that
    runs imports them (dist_train/bench/__init__.py). In a fresh interpreter: this one has torch already."""
    code = f"""
import sys
from dist_train.cli import _bench_modules, build_parser, main

def loaded():
    measuring = {{"dist_train.bench." + name for name in _bench_modules()}}
    return sorted(m for m in sys.modules if m == "torch" or m in measuring)

assert not loaded(), ("import dist_train.cli", loaded())
build_parser("bench")
assert not loaded(), ("building the bench parser", loaded())
refusals = {_BENCH_REFUSALS!r}
assert sorted(refusals) == sorted(_bench_modules()), sorted(_bench_modules())
for name, argv in refusals.items():
    try:
        main(["bench", name, "--help"])
    except SystemExit as e:
        assert e.code == 0, (name, e.code)
    assert not loaded(), ("bench " + name + " --help", loaded())
    assert main(["bench", name, *argv]) == 2, name
    assert not loaded(), ("bench " + name + " refusing " + " ".join(argv), loaded())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("dist-train: error:")]
    assert len(errors) == len(_BENCH_REFUSALS), r.stderr[-3000:]


# commands defined outside dist_train/cli.py: an argument each one's parser refuses (argparse, exit 2)
_COMMAND_REFUSALS = {"launch": ["configs/gpt_tiny.yaml", "--backend", "slurm"],
                     "submit": ["configs/gpt_tiny.yaml", "--scheduler", "lsf", "--time", "01:00:00"],
                     "ckpt": ["convert", "runs/x", "--to", "onnx", "out"]}


def test_launch_submit_and_ckpt_help_and_refused_flags_import_no_torch():
    """`launch`, `submit` and `ckpt`: their flags come from torch-free modules (launchers.arguments,
    dist_train.checkpoint_arguments); the modules that run them (preflight, the checkpoint package: torch) are
    imported only when the command runs. In a fresh interpreter: this one has torch already."""
    code = f"""
import sys
from dist_train.cli import main

def loaded():
    return sorted(m for m in ("torch", "launchers.cli", "dist_train.checkpoint", "dist_train.preflight")
                  if m in sys.modules)

for name, argv in {_COMMAND_REFUSALS!r}.items():
    for args in (["--help"], argv):
        try:
            main([name, *args])
        except SystemExit as e:
            assert e.code == (0 if args == ["--help"] else 2), (name, args, e.code)
        else:
            raise AssertionError((name, args, "did not exit"))
        assert not loaded(), (name, args, loaded())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum("invalid choice" in line for line in r.stderr.splitlines()) == len(_COMMAND_REFUSALS), r.stderr


def test_bench_command_that_runs_loads_its_measuring_module(monkeypatch, capsys):
    """The dispatch imports dist_train.bench.NAME once NAME passed its torch-free checks; a check that needs
    torch (attention's layout names, from parallelism.context) refuses there, exit 2, one line."""
    monkeypatch.delitem(sys.modules, "dist_train.bench.attention", raising=False)
    assert main(["bench", "attention", "--layout", "spiral"]) == 2
    assert "dist_train.bench.attention" in sys.modules
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dist-train: error: --layout 'spiral': unknown ['spiral']; valid: contiguous, striped, zigzag"], err


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    cfg = load_config(path, [])
    assert cfg.world_size >= 1


@pytest.mark.parametrize("parallel, msg", [
    # measured: ZeRO-1, 3 steps: clipping at 1e-6 under train.grad_clip 1.0 changed the losses from step 2, silently
    ({"zero_stage": 1, "deepspeed": {"gradient_clipping": 1e-6}},
     "parallel.deepspeed.gradient_clipping = 1e-06 contradicts train.grad_clip = 1.0"),
    ({"zero_stage": 1, "deepspeed": {"train_micro_batch_size_per_gpu": 1}},
     "parallel.deepspeed.train_micro_batch_size_per_gpu = 1 contradicts train.micro_batch = 2"),
    ({"zero_stage": 1, "deepspeed": {"gradient_accumulation_steps": 1}},
     "parallel.deepspeed.gradient_accumulation_steps = 1 contradicts"),
    ({"zero_stage": 1, "deepspeed": {"zero_optimization": {"stage": 3}}},
     "parallel.deepspeed.zero_optimization.stage = 3 contradicts parallel.zero_stage = 1"),
    ({"zero_stage": 1, "deepspeed": {"bf16": {"enabled": True}}},
     "parallel.deepspeed.bf16.enabled: set train.precision"),
    ({"zero_stage": 1, "deepspeed": {"fp16": {"enabled": True}}}, "parallel.deepspeed.fp16"),
    ({"zero_stage": 1, "deepspeed": {"optimizer": {"type": "Lamb"}}}, "parallel.deepspeed.optimizer"),
    ({"zero_stage": 1, "deepspeed": {"scheduler": {"type": "WarmupLR"}}}, "parallel.deepspeed.scheduler"),
    ({"zero_stage": 1, "deepspeed": {"train_batch_size": 64}}, "parallel.deepspeed.train_batch_size"),
    ({"deepspeed": {"zero_optimization": {"overlap_comm": True}}},
     "parallel.deepspeed is set but parallel.zero_stage is null"),
])
def test_deepspeed_keys_that_contradict_the_config_are_refused(parallel, msg, tmp_path):
    """parallel.deepspeed is merged over the DeepSpeed config dist-train generates from its own fields: a key there
    overrode them (the run did other than its config, and every checkpoint's recorded config, says) or was ignored.
    Equal values, and keys dist-train does not generate, pass."""
    with pytest.raises(ConfigError) as info:
        tiny_gpt_config(tmp_path, parallel=parallel)
    assert msg in str(info.value) and "\n" not in str(info.value), info.value
    tiny_gpt_config(tmp_path, parallel={"zero_stage": 1, "deepspeed": {
        "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"immediate_grad_update": True}}})


@pytest.mark.parametrize("kind, key, value", [
    ("gpt", "window", 16), ("gpt", "patch_size", 2), ("gpt", "in_channels", 3), ("gpt", "out_channels", 3),
    ("gpt", "wrap", [True, True]),
    ("swin", "attention_window", 16), ("swin", "rope_theta", 5.0), ("swin", "head_dim", 8), ("swin", "n_kv_heads", 1),
    ("swin", "tie_embeddings", True), ("swin", "vocab_size", 100),
    ("swin", "rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}),
])
def test_a_model_field_of_the_other_kind_is_refused(kind, key, value, tmp_path):
    """The GPT builds no Swin field and the Swin no GPT field: `model.window: 16` on a GPT (meant as its sliding
    window, which is model.attention_window) trained full causal attention without a word. A field of the other
    kind that differs from its default is refused in one line; its default (what an HF import or a full dump
    records) passes."""
    build = (lambda m: tiny_gpt_config(tmp_path, model=m)) if kind == "gpt" else \
        (lambda m: tiny_swin_config(tmp_path, tmp_path / "w", model=m))
    with pytest.raises(ConfigError) as info:
        build({key: value})
    msg = str(info.value)
    assert f"model.{key} = {value!r}" in msg and f"model.kind = {kind}" in msg and "\n" not in msg, msg
    default = dataclasses.asdict(ModelConfig())[key]
    build({key: default})
