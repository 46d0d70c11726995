"""``dist-train eval``: a checkpoint's validation loss without training.

The loss equals the ``valid_loss`` the trainer logged at the checkpoint's step: bit for bit on the trained layout
(same weights, same batches, same reduction), within 1e-5 under dp2 / cp2 / tp2 / pp2 on 2 ranks (the validation
contract across layouts, tests/test_validation.py). The command only reads the run dir (no file there changes,
even while a job holds its lock), and bad input is one line and exit 2 before any rank starts."""
from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dist_train import eval_preflight, preflight
from dist_train.cli import main
from dist_train.bench.attention import peak_tensor_bytes
from dist_train.bench.cli.ckpt import engine_config
from dist_train.checkpoint import CheckpointManager
from dist_train.checkpoint_eval import evaluate_checkpoint
from dist_train.config import ConfigError, config_from_dict, load_config, save_config
from dist_train.cost import evaluation_state_bytes, rank_inputs
from dist_train.distributed import current_context
from dist_train.engines import autocast_dtype, build_engine
from dist_train.engines.deepspeed import DeepSpeedForwardEngine
from dist_train.mesh import build_mesh
from dist_train.runlock import hold_run_dir
from dist_train.trainer import build_model, train
from dist_train.eval_preflight import check_evaluation_fits, choose_checkpoint
from dist_train.plan.profiles import builtin_profiles
from dist_train.preflight import check_model_fits
from launchers.evaluate import RESULT_MARKER, ResultSink, report
from tests.dist_harness import run_ranks
from tests.trainer_utils import (EVAL_TRAIN, one_eval_result, run_cli_here, run_dir_files, stale_file_handle_in,
                                 tiny_gpt_config, tiny_swin_config, validated_checkpoints)

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"dp2": ["parallel.dp=2"], "cp2": ["parallel.cp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run validated and checkpointed after each step -> (config path, run dir, {step: logged valid_loss})."""
    return validated_checkpoints(tmp_path_factory.mktemp("eval"))


def test_eval_loss_is_the_logged_validation_loss_bit_for_bit(trained):
    cfg_path, run_dir, logged = trained
    for step in (1, 2):
        result = evaluate_checkpoint(load_config(str(cfg_path)), run_dir / "checkpoints" / f"step_{step}",
                                     current_context())
        assert result["step"] == step
        assert result["loss"] == logged[step]  # the trainer's number, exactly
        assert result["count"] == 2 * 4 * 32 and result["batches"] == 2  # eval_steps x global_batch x seq_len


def _layout_losses(rank, world, cfg_path, ckpt):
    _eval_engine_allocates_no_buckets(load_config(cfg_path, LAYOUTS["dp2"]), world)
    return {name: evaluate_checkpoint(load_config(cfg_path, sets), Path(ckpt), current_context())["loss"]
            for name, sets in LAYOUTS.items()}


def _eval_engine_allocates_no_buckets(cfg, world: int) -> None:
    """Under dp 2 the training engine's DDP wrapper allocates flat gradient buckets (the weights' bytes again);
    the evaluation's forward-only engine allocates nothing (what eval's pre-flight counts)."""
    mesh = build_mesh(cfg.parallel, world)
    weights = sum(p.numel() * p.element_size() for p in build_model(cfg, mesh, torch.device("cpu")).parameters())
    peaks = {}
    for evaluation_only in (False, True):
        model = build_model(cfg, mesh, torch.device("cpu"))
        peaks[evaluation_only] = peak_tensor_bytes(lambda: build_engine(cfg, model, mesh, None, evaluation_only))[1]
    assert peaks[False] >= weights and peaks[True] == 0, (peaks, weights)


@pytest.mark.slow
def test_eval_on_two_ranks_matches_the_logged_loss_under_dp_cp_tp_pp(trained):
    """... and under dp 2 eval's engine holds no DDP buckets (``_eval_engine_allocates_no_buckets``)."""
    cfg_path, run_dir, logged = trained
    results = run_ranks(_layout_losses, 2, args=(str(cfg_path), str(run_dir / "checkpoints" / "step_2")), timeout=600)
    for rank, got in enumerate(results):
        for name, loss in got.items():
            assert abs(loss - logged[2]) <= 1e-5, (rank, name, loss, logged[2])


#: an evaluation in bf16 autocast with tp 2
BF16_TP2 = ["train.precision=bf16", "parallel.tp=2"]


def _bf16_tp2_loss(rank, world, cfg_path, ckpt):
    return evaluate_checkpoint(load_config(cfg_path, BF16_TP2), Path(ckpt), current_context())["loss"]


def test_a_bf16_evaluation_with_tp_2_on_cpu_matches_one_rank(trained):
    """Launch refuses bf16 autocast with tp 2 on CPU: Megatron's tensor-parallel linears fail in their backward there
    (engines.cpu_autocast_refusal). An evaluation runs no backward: its pre-flight and engine take it, and its loss on
    2 CPU ranks is one rank's bf16 loss and the fp32 loss the trainer logged, each within bf16's unit roundoff (2^-9)
    relative. Measured: 4.0856268 at tp 2, 4.0855681 on one rank, 4.0855283 in fp32 (1.4e-5 and 2.4e-5 relative)."""
    cfg_path, run_dir, logged = trained
    cfg = load_config(str(cfg_path), BF16_TP2)
    with pytest.raises(ConfigError, match="restore autocast in their backward only on CUDA"):
        preflight.check_engine(cfg, on_cuda=False)
    ckpt = eval_preflight.eval_preflight(cfg, None, on_cuda=False, ranks_per_host=2)
    assert ckpt == (run_dir / "checkpoints" / "step_2").resolve()
    one_rank = evaluate_checkpoint(load_config(str(cfg_path), ["train.precision=bf16"]), ckpt,
                                   current_context())["loss"]
    for loss in run_ranks(_bf16_tp2_loss, 2, args=(str(cfg_path), str(ckpt))):
        for reference in (one_rank, logged[2]):
            assert abs(loss - reference) <= 2 ** -9 * reference, (loss, one_rank, logged[2])


def _eval_in_process(cfg_path, cwd, capfd, monkeypatch, *flags):
    """``dist-train eval`` whose launcher is this process (its ranks are processes of their own, started by the
    backend as from the command): the launcher's interpreter start (~5 s of CPU importing torch and the launchers)
    is not what is tested here; test_launch_e2e.py::test_eval_on_a_ray_cluster runs the command as a process of its
    own. What the launcher and its ranks write to stdout and stderr, as a subprocess's result."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return run_cli_here(capfd, "eval", str(cfg_path), *flags)


@pytest.mark.slow
def test_cli_under_local_and_mpi_reads_only_ignores_the_run_lock_and_agrees(trained, tmp_path, capfd, monkeypatch):
    """The ranks start as `dist-train launch` starts them: local subprocesses, or mpiexec (2 ranks, dp2) with the
    same loss, bit for bit, as the local ranks, and the trainer's logged valid_loss within 1e-5."""
    from launchers.mpi import find_mpiexec

    cfg_path, run_dir, logged = trained
    backends = ["local", *(["mpi"] if find_mpiexec() else [])]
    results = {}
    # a job holds the run dir: the evaluation neither waits for nor takes its lock
    with hold_run_dir(run_dir, 0):
        before = run_dir_files(run_dir)
        for backend in backends:
            out = tmp_path / f"{backend}.json"
            proc = _eval_in_process(cfg_path, tmp_path, capfd, monkeypatch, "--checkpoint", "latest", "--set",
                                    "parallel.dp=2", "--backend", backend, "--out", str(out))
            results[backend] = one_eval_result(proc, out)
        after = run_dir_files(run_dir)
    assert after == before  # nothing written, moved or removed in the run dir (its lock file included)
    for backend, result in results.items():
        assert result["step"] == 2 and result["world_size"] == 2 and result["layout"]["dp"] == 2, backend
        assert abs(result["loss"] - logged[2]) <= 1e-5, (backend, result["loss"], logged[2])
    if "mpi" not in results:
        pytest.skip("no mpiexec on this machine (pip install mpich): the local backend alone was checked")
    assert results["mpi"]["loss"] == results["local"]["loss"]


def test_the_result_sink_keeps_rank_0s_result_line_off_the_console():
    seen = []
    sink = ResultSink(lambda stream, text: seen.append((stream, text)))
    sink("stderr", "[rank 0] loading\n")
    sink("stdout", f"[rank 1] {RESULT_MARKER}" + '{"loss": 9}\n')  # not rank 0's: passed on
    sink("stdout", f"[rank 0] {RESULT_MARKER}" + '{"loss": 4.5, "step": 2}\n')
    assert sink.result == {"loss": 4.5, "step": 2}
    assert [t for _, t in seen] == ["[rank 0] loading\n", f"[rank 1] {RESULT_MARKER}" + '{"loss": 9}\n']


@pytest.mark.parametrize("extra, says", [
    (["--checkpoint", "NOWHERE"], "--checkpoint NOWHERE: no such checkpoint"),
    (["--set", "model.d_model=64"], "holds a model of another size"),
    (["--set", "model.rope_theta=500.0"], "model.rope_theta"),
    (["--set", "data.source=indexed", "--set", "data.path=NOWHERE", "--data", "NOWHERE_VALID"],
     "data.valid_path = NOWHERE_VALID"),
    (["--set", "train.eval_every=0"], "train.eval_every = 0"),
    (["--backend", "mpi", "--nodes", "2"], "--nodes 2 with --backend mpi: only the ray backend spans nodes"),
    (["--backend", "local", "--nproc", "3"], "(launching 3; pass --nproc 1 or change parallel.*"),
    (["--backend", "local", "--address", "10.0.0.1:6379"], "--address '10.0.0.1:6379' with --backend local"),
    (["--set", "data.source=indexed", "--set", "data.path=NOWHERE"], "no held-out data to evaluate on"),
    (["--set", "data.source=indexed", "--set", "data.path=NOWHERE", "--set", "data.split=100,0,0"],
     "no held-out data to evaluate on"),
    # the result was computed, then its write failed on the temp file's name
    (["--out", "NOWHERE_DIR/e.json"], "--out NOWHERE_DIR/e.json: no directory NOWHERE_DIR to write it in"),
    (["--out", "."], "--out .: is a directory; give a file name"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_rank(trained, capsys, extra, says):
    cfg_path, _, _ = trained
    assert main(["eval", str(cfg_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_an_io_error_while_verifying_the_checkpoint_is_one_line_not_a_traceback(trained, capsys, monkeypatch):
    """ESTALE while verifying the newest checkpoint says nothing about its bytes: no fall-back to an older step
    (that would evaluate another checkpoint than asked), no "damaged", and no traceback: one line, exit 2, as the
    launch pre-flight's resume check says it (``preflight.newest_verified``, shared)."""
    cfg_path, _, _ = trained
    stale_file_handle_in(monkeypatch, "step_2")
    assert main(["eval", str(cfg_path), "--backend", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dist-train: error: --checkpoint latest: ") and "step_2" in err[0], err
    assert "Stale file handle" in err[0] and "try again" in err[0] and "damaged" not in err[0], err


#: a 17.6B-parameter GPT trained in bf16: its fp32 weights (65.7 GiB) fit an 80 GiB device, its training states
#: (16 B a parameter with gradients and AdamW: 263 GiB) do not
BIG = ["model.d_model=8192", "model.n_layers=20", "model.n_heads=64", "model.n_kv_heads=8", "model.ffn_hidden=28672",
       "model.vocab_size=32000", "train.precision=bf16"]
#: 1.1T parameters: not even their weights fit
HUGE = ["model.d_model=16384", "model.n_layers=400", "model.n_heads=128"]


@pytest.fixture
def eighty_gib(monkeypatch):
    """Both pre-flights see an 80 GiB device (H100's profile), on CPU ranks too: sizes that do not depend on the host."""
    device = (builtin_profiles()["h100"], "h100")
    monkeypatch.setattr(preflight, "device_profile", lambda on_cuda: device)
    monkeypatch.setattr(eval_preflight, "device_profile", lambda on_cuda: device)


@pytest.mark.parametrize("parallel", [[], ["parallel.dp=2"], ["parallel.pp=2"], ["parallel.fsdp=true", "parallel.dp=2"]])
def test_evals_preflight_counts_the_weights_it_holds_not_a_training_steps_states(trained, eighty_gib, parallel):
    """An evaluation holds the weights (fp32 under autocast; FSDP2: their shards), no gradients, optimizer state or
    DDP buckets (engines.ForwardEngine): a model whose weights fit is evaluated, though launch refuses to train it."""
    cfg_path, _, _ = trained
    cfg = load_config(str(cfg_path), BIG + parallel)
    check_evaluation_fits(cfg, on_cuda=True, ranks_per_host=1)
    with pytest.raises(ConfigError, match="for weights, gradients and optimizer state alone"):
        check_model_fits(cfg, on_cuda=True, ranks_per_host=1)
    huge = load_config(str(cfg_path), HUGE + parallel)
    with pytest.raises(ConfigError, match=r"[\d,.]+B parameters need [\d,.]+ GiB per rank for an evaluation's fp32 "
                                          r"weights alone, no gradients or optimizer state \(tp=1"):
        check_evaluation_fits(huge, on_cuda=True, ranks_per_host=1)


def test_evals_preflight_counts_what_deepspeed_allocates(trained, eighty_gib):
    """DeepSpeed's engine of an evaluation is built without an optimizer: its weights in DeepSpeed's dtype alone, no
    fp32 master copy, moments or gradients: the big model in bf16 under ZeRO-2 at dp2 (its bf16 weights: 32.9 GiB) is
    evaluated though launch refuses to train it; a huge one is refused, saying what was counted."""
    zero2 = ["parallel.dp=2", "parallel.zero_stage=2"]
    cfg = load_config(str(trained[0]), BIG + zero2)
    check_evaluation_fits(cfg, on_cuda=True, ranks_per_host=1)
    with pytest.raises(ConfigError, match="for weights, gradients and optimizer state alone"):
        check_model_fits(cfg, on_cuda=True, ranks_per_host=1)
    with pytest.raises(ConfigError, match=r"for an evaluation's weights alone, in DeepSpeed's dtype \(ZeRO-3: their "
                                          r"partitions and the persistent parameters\), no gradients or optimizer "
                                          r"state \(tp=1"):
        check_evaluation_fits(load_config(str(trained[0]), HUGE + zero2), on_cuda=True, ranks_per_host=1)


def _live_tensor_bytes() -> dict[int, int]:
    """Every live CPU tensor's storage, each once: data pointer -> bytes."""
    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return storages


#: DeepSpeed at every ZeRO stage, in fp32 and bf16
EVAL_ZERO = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


def _zero_config(stage: int, precision: str, lr: float = 3e-4):
    """The 1.2M-parameter GPT of bench ckpt's engine runs under ZeRO-``stage`` at dp 2, one micro-batch a step."""
    d = engine_config({"dp": 2, "zero_stage": stage})
    d["train"].update(precision=precision, global_batch=2, micro_batch=1, lr=lr)
    return config_from_dict(d)


def _batch(cfg, rank: int) -> list[dict]:
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(rank))
    return [{"tokens": tokens, "labels": tokens, "positions": torch.arange(16)}]


def _deepspeed_eval_holdings(rank: int, world: int) -> list[tuple[int, float]]:
    """Per EVAL_ZERO layout: (bytes of the tensors an evaluation's DeepSpeed engine holds after its build and two
    forwards, what eval's pre-flight counts)."""
    out = []
    for stage, precision in EVAL_ZERO:
        cfg = _zero_config(stage, precision)
        mesh = build_mesh(cfg.parallel, world)
        gc.collect()
        before = _live_tensor_bytes()
        model = build_model(cfg, mesh, torch.device("cpu"))
        engine = build_engine(cfg, model, mesh, autocast_dtype(cfg, torch.device("cpu")), evaluation_only=True)
        for _ in range(2):  # ZeRO-3 gathers its persistent parameters for good from the second forward on
            engine.eval_loss_sum(_batch(cfg, rank))
        gc.collect()
        held = sum(n for ptr, n in _live_tensor_bytes().items() if ptr not in before)
        sh, loc = rank_inputs(cfg, builtin_profiles()["cpu"])
        out.append((held, evaluation_state_bytes(cfg, sh, loc)))
        del engine, model
    return out


@pytest.mark.slow  # ~6 s: two ranks build 8 DeepSpeed engines
def test_evals_preflight_counts_what_an_evaluations_deepspeed_engine_holds():
    """An evaluation's DeepSpeed engine is built without an optimizer: it holds the weights in DeepSpeed's dtype
    (ZeRO-3: its partitions and the persistent parameters, whole from the second forward on), and the pre-flight
    counts that within 128 B (the loss) at every stage in fp32 and bf16. Per rank at dp 2 the engine built with its
    optimizer held (same meter) ZeRO-0 bf16 17,214,164 B, ZeRO-1/2 fp32 7,377,536 and bf16 4,918,400, ZeRO-3 fp32
    14,068,353 and bf16 8,263,809; now 2,459,264, 4,918,400, 2,459,264, 4,231,808 and 2,115,968 (ZeRO-0 fp32: 4,918,400
    both). After one forward only, ZeRO-3's persistent parameters are not yet held (its first forward records the
    module trace and releases them): what made the earlier ZeRO-3 count look 1.14x high."""
    for rank_result in run_ranks(_deepspeed_eval_holdings, 2, timeout=300):
        for (held, counted), layout in zip(rank_result, EVAL_ZERO, strict=True):
            assert abs(counted - held) <= 1024, (layout, held, counted)


def _zero_eval_losses(rank: int, world: int, root: str) -> dict:
    """Per precision: a ZeRO-1 engine after one step (lr 1e-2: its fp32 masters are no longer bf16 values) saves a
    checkpoint; -> {(stage, precision): (its own eval loss sum, a forward-only engine's after loading the checkpoint,
    that engine's optimizer, the same engine's second forward, the load's peak of new tensor bytes over the model's
    fp32 bytes)}."""
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = _zero_config(1, precision, lr=1e-2)
        mesh = build_mesh(cfg.parallel, world)
        dtype = autocast_dtype(cfg, torch.device("cpu"))
        trained = build_engine(cfg, build_model(cfg, mesh, torch.device("cpu")), mesh, dtype)
        trained.train_step(_batch(cfg, rank), 32.0)
        reference = trained.eval_loss_sum(_batch(cfg, rank))  # what the run's validation gives at this step
        saver = CheckpointManager(cfg.checkpoint, run_dir=f"{root}/{precision}", rank=rank, world_size=world,
                                  **trained.checkpoint_kwargs())
        saver.save(1, trained.module, trained.optimizer)
        del trained
        for stage in (0, 1, 2, 3):
            cfg = _zero_config(stage, precision)
            model = build_model(cfg, mesh, torch.device("cpu"))
            fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
            with contextlib.redirect_stdout(io.StringIO()) as printed:  # rank 0's stdout is eval's one result line
                engine = build_engine(cfg, model, mesh, dtype, evaluation_only=True)
            assert printed.getvalue() == "", (stage, precision, printed.getvalue())
            loader = CheckpointManager(cfg.checkpoint, run_dir=f"{root}/{precision}", rank=rank, world_size=world,
                                       **engine.checkpoint_kwargs())
            _, peak = peak_tensor_bytes(lambda: loader.load(saver.root / "step_1", engine.module, with_rng=False))
            first = engine.eval_loss_sum(_batch(cfg, rank))
            out[(stage, precision)] = (reference, first, engine.optimizer, engine.eval_loss_sum(_batch(cfg, rank)),
                                       peak / fp32_bytes)
    return out


def test_what_deepspeed_printed_before_its_build_failed_reaches_stderr(tmp_path, capsys):
    """The forward-only engine holds back what ``deepspeed.initialize`` prints (rank 0's stdout is eval's one result
    line): dropped when the build succeeds, written to stderr (a launched rank's log) when it fails, before the error
    goes on. Everything was dropped before, failure or not."""
    cfg = tiny_gpt_config(tmp_path / "run", parallel={"dp": 1, "zero_stage": 1})
    engine = types.SimpleNamespace(mesh=build_mesh(cfg.parallel, 1), ds_config={})

    def initialize(fails: bool):
        def build(**kwargs):
            print("[deepspeed] sizing the buffers")
            if fails:
                raise RuntimeError("no room for the buffers")
            return "engine", None, None, None
        return types.SimpleNamespace(initialize=build)

    assert DeepSpeedForwardEngine._initialize(engine, initialize(False), cfg, None) == ("engine", None, None)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(RuntimeError, match="no room for the buffers"):
        DeepSpeedForwardEngine._initialize(engine, initialize(True), cfg, None)
    out, err = capsys.readouterr()
    assert out == "" and err == "[deepspeed] sizing the buffers\n", (out, err)


@pytest.mark.slow  # ~6 s: two ranks build 2 training and 8 forward-only DeepSpeed engines
def test_a_deepspeed_evaluation_holds_no_optimizer_and_its_loss_is_the_trained_engines(tmp_path):
    """ZeRO-0/1/2/3 in fp32 and bf16 at dp 2: the forward-only engine (no optimizer; the checkpoint's fp32 weights
    loaded into the module's parameters in DeepSpeed's dtype, ZeRO-3: into each rank's partitions) gives the trained
    engine's loss bit for bit, also from its second forward (ZeRO-3's persistent parameters then gathered for good);
    its build prints nothing (in bf16 at stage 0 DeepSpeed's wrapper of the missing optimizer printed 6 lines on
    rank 0, where ``dist-train eval`` prints its one result line). The engine built with its optimizer, loaded
    without optimizer state (the earlier eval), gave the same numbers (checked once, 2 ranks, 2026-12-01).

    A bf16 load reads the fp32 checkpoint through scratch tensors cast into the weights: one file's at a time
    (checkpoint/storage.py ``SafeReader.read_data``), here half the model's fp32 bytes (0.52x, ZeRO-3 0.25x: its
    half of each); every file's at once before, 1.0x and 0.5x, more than the fp32 master partition the engine no
    longer holds."""
    for rank_result in run_ranks(_zero_eval_losses, 2, args=(str(tmp_path),), timeout=300):
        assert set(rank_result) == set(EVAL_ZERO)
        for (stage, precision), (reference, first, optimizer, second, peak) in rank_result.items():
            assert optimizer is None and first == reference and second == reference, (stage, precision, reference,
                                                                                       first, second)
            assert peak <= (0.6 if stage < 3 else 0.3), (stage, precision, peak)


def test_a_model_whose_weights_fit_is_evaluated_and_a_huge_one_refused_through_the_cli(trained, eighty_gib, tmp_path,
                                                                                       capsys):
    """Through the commands: launch refuses the big model's training states in one line, exit 2; eval's pre-flight
    lets its weights through to the next check (the checkpoint holds another model: one line, exit 2, no rank
    started); the huge model is refused by both for its size."""
    cfg_path, _, _ = trained
    sets = [a for kv in BIG for a in ("--set", kv)]
    assert main(["launch", str(cfg_path), *sets, "--set", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB per rank for weights, gradients and optimizer state alone" in err[0], err
    assert main(["eval", str(cfg_path), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a model of another size" in err[0], err
    huge = [a for kv in HUGE for a in ("--set", kv)]
    assert main(["eval", str(cfg_path), *huge]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB per rank for an evaluation's fp32 weights alone" in err[0], err
    assert main(["launch", str(cfg_path), *huge, "--set", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB per rank for weights, gradients and optimizer state alone" in err[0], err


def test_a_run_without_checkpoints_is_refused(tmp_path, capsys):
    cfg = tiny_gpt_config(tmp_path / "fresh", train=EVAL_TRAIN)
    save_config(cfg, tmp_path / "cfg.yaml")
    assert main(["eval", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint latest: no step_N checkpoint under" in err[0], err
    assert not (tmp_path / "fresh").exists()  # nothing created


def test_swin_eval_is_the_logged_validation_mse(tmp_path):
    """A swin (weather batches, normalised with the statistics its checkpoint recorded): the validation MSE the
    trainer logged, bit for bit, and no perplexity."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "data", steps=2, data={"split": "75,25,0"},
                           train={"eval_every": 2, "eval_steps": 1}, checkpoint={"at_end": True})
    logged = train(cfg).summary["valid_loss"]
    result = evaluate_checkpoint(cfg, tmp_path / "run" / "checkpoints" / "step_2", current_context())
    assert result["loss"] == logged and result["perplexity"] is None and result["count_unit"] == "values"
    assert result["input_normalisation_note"] is None  # the checkpoint's statistics are this data's own


def test_a_swin_eval_on_other_fields_names_the_statistics_it_normalised_with(tmp_path, capsys):
    """On other fields a Swin checkpoint is evaluated with the statistics it was trained with (as a resume keeps
    them), and the result said nothing about it; an import that records none was evaluated with the data's own
    without a word. Both are now named: in the result and on stderr."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "data", steps=1, data={"split": "75,25,0"},
                           train={"eval_every": 1, "eval_steps": 1}, checkpoint={"at_end": True})
    train(cfg)
    other = tiny_swin_config(tmp_path / "run", tmp_path / "other", steps=1, run={"seed": 5},
                             data={"split": "75,25,0"}, train={"eval_every": 1, "eval_steps": 1})
    result = evaluate_checkpoint(other, tmp_path / "run" / "checkpoints" / "step_1", current_context())
    assert result["input_normalisation_note"].startswith("the inputs are normalised with the statistics the "
                                                         "checkpoint's model was trained with"), result
    report(result, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval: the inputs are normalised"), err


def test_the_default_checkpoint_is_the_runs_newest_else_what_resume_names(trained, tmp_path):
    """A fine-tune config names its start (checkpoint.resume = PATH): before the run's first save that is what is
    evaluated, afterwards the run's own newest, as a restart would resume."""
    cfg_path, run_dir, _ = trained
    start = run_dir / "checkpoints" / "step_1"
    fresh = load_config(str(cfg_path), [f"run.dir={tmp_path / 'fine'}", f"checkpoint.resume={start}"])
    assert choose_checkpoint(fresh, None) == start.resolve()
    own = load_config(str(cfg_path), [f"checkpoint.resume={start}"])
    assert choose_checkpoint(own, None) == (run_dir / "checkpoints" / "step_2").resolve()
    assert choose_checkpoint(own, str(start)) == start.resolve()


# -- dist-train submit --eval ---------------------------------------------------------------------------------------
#: srun for a test: starts the step's tasks on this machine with the variables a Slurm step gives them
FAKE_SRUN = '''#!/bin/bash
n=1
while [[ "${1:-}" == -* ]]; do [[ "$1" == --ntasks=* ]] && n=${1#--ntasks=}; shift; done
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_NUM_TASKS=$n SLURM_STEP_TASKS_PER_NODE=$n \
    SLURM_STEP_NODELIST=localhost SLURM_STEP_ID=0 "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
'''


def _submit(cfg_path, *flags):
    return main(["submit", str(cfg_path), "--scheduler", "slurm", "--nodes", "1", "--ntasks-per-node", "2", "--time",
                 "00:10:00", "--set", "parallel.dp=2", *flags])


def test_submit_eval_script_runs_dist_train_eval_on_the_allocations_ranks(trained, tmp_path, capsys, monkeypatch):
    """`submit --eval`: the ranks run `dist_train eval` on the checkpoint chosen at submission (no restart override,
    no requeue, no time-limit signal), their logs go to FILE.json.job, never under run.dir; under --backend ray the
    job's launcher is `dist-train eval --backend ray` on the job's cluster."""
    cfg_path, run_dir, _ = trained
    monkeypatch.chdir(tmp_path)
    before = run_dir_files(run_dir)
    step = (run_dir / "checkpoints" / "step_2").resolve()
    job_args = f"{cfg_path} --set parallel.dp=2 --set train.eval_every=1 --checkpoint {step} --out e.json"
    assert _submit(cfg_path, "--eval", "--out", "e.json", "--dry-run") == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    logs = Path.cwd() / "e.json.job" / "logs"
    assert f"#SBATCH --output={logs}/slurm-%j.out" in lines
    assert "export DIST_TRAIN_EVAL_RANK=e.json.job  # eval ranks: logs, error records" in lines
    assert (f"srun --ntasks=2 --ntasks-per-node=2 {sys.executable} -m launchers.rankio --log-dir {logs} "
            f"--preempted-exit 75 -- {sys.executable} -m dist_train eval {job_args}") in lines
    assert "checkpoint.restart" not in text and "--signal" not in text and "scontrol requeue" not in text
    assert _submit(cfg_path, "--eval", "--out", "e.json", "--backend", "ray", "--dry-run") == 0
    ray = capsys.readouterr().out
    assert (f'{sys.executable} -m dist_train eval --backend ray --nodes 1 --nproc 2 {job_args} '
            f'--address "$HEAD_IP:$RAY_PORT" &') in ray.splitlines()
    assert "DIST_TRAIN_EVAL_RANK" not in ray  # the job's eval launcher sets it for its ranks alone
    assert main(["submit", str(cfg_path), "--scheduler", "pbs", "--nodes", "2", "--ntasks-per-node", "1", "--time",
                 "00:10:00", "--set", "parallel.dp=2", "--eval", "--out", "e.json", "--dry-run"]) == 0
    pbs = capsys.readouterr().out.splitlines()
    ranks = next(i for i, line in enumerate(pbs) if " -n 2 --ppn 1 " in line)
    assert pbs[ranks - 1].startswith("export DIST_TRAIN_EVAL_RANK=e.json.job ")
    assert pbs[ranks].endswith(f"-m dist_train eval {job_args}") and "qsub" not in "\n".join(pbs)
    assert not (tmp_path / "e.json.job").exists()  # a dry run writes nothing
    # no scheduler here: the script is written (config copy beside it) and sbatch's absence is the one line
    assert _submit(cfg_path, "--eval", "--out", "e.json") == 2
    assert "sbatch not found on PATH: the script is at e.json.job/submit_slurm.sh" in capsys.readouterr().err
    script = (tmp_path / "e.json.job" / "submit_slurm.sh").read_text()
    copy = next((tmp_path / "e.json.job").glob("submitted_config-*.yaml")).absolute()
    assert f"-m dist_train eval {copy} --set parallel.dp=2" in script
    assert run_dir_files(run_dir) == before


@pytest.mark.parametrize("flags, says", [
    (["--eval"], "--eval without --out: give --out FILE.json"),
    (["--out", "e.json"], "--out is a flag of an evaluation job: add --eval"),
    (["--eval", "--out", "e.json", "--set", "model.d_model=64"], "holds a model of another size"),
    (["--eval", "--out", "e.json", "--checkpoint", "NOWHERE"], "--checkpoint NOWHERE: no such checkpoint"),
])
def test_submit_eval_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys, monkeypatch, flags, says):
    cfg_path, _, _ = trained
    monkeypatch.chdir(tmp_path)
    assert _submit(cfg_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_submitted_eval_job_writes_the_result(trained, tmp_path, monkeypatch):
    """The generated Slurm script run by bash, its srun a stand-in that starts the 2 ranks here with a Slurm step's
    variables: rank 0 writes --out (the logged loss) and prints the one line into the job's output."""
    cfg_path, run_dir, logged = trained
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")  # srun on PATH: sbatch still is not
    before = run_dir_files(run_dir)
    assert _submit(cfg_path, "--eval", "--out", "e.json") == 2  # written; no sbatch to submit it
    env = {**os.environ, "SLURM_JOB_ID": "7"}
    job = subprocess.run(["bash", "e.json.job/submit_slurm.sh"], env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["step"] == 2 and result["world_size"] == 2 and abs(result["loss"] - logged[2]) <= 1e-5
    said = [line for line in job.stdout.splitlines() if "(step 2): loss" in line]
    assert len(said) == 1 and said[0].startswith("[rank 0] eval "), job.stdout
    assert run_dir_files(run_dir) == before
