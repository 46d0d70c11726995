"""The checks ``dist-train eval`` (and ``dist-train submit --eval``) make before any rank starts, and its choice of
checkpoint: one line and exit 2 for bad input, nothing written.

    cfg = load_eval_config("cfg.yaml", user_sets, eval_overrides(user_sets, data, batches))
    step_dir = eval_preflight(cfg, "latest", on_cuda=False, ranks_per_host=2)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .checkpoint import compat
from .checkpoint import manifest as mf
from .checkpoint.manager import checkpoint_root, resume_candidates
from .config import Config, ConfigError, TrainConfig, load_config, parse_split
from .cost import evaluation_state_bytes, rank_inputs
from .dryrun import device_profile
from .preflight import check_data, check_engine, check_model_shapes, newest_verified, refuse_beyond_memory


def load_eval_config(config: str, user_overrides: list[str], overrides: list[str]) -> Config:
    """The config as the ranks load it (``overrides``: :func:`eval_overrides`). A config that has no held-out data
    is refused naming this command's ways to give it, not the validation schedule it never asked for."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        try:
            # validation off (eval_steps at its default, as the config then wants it) shows the data as configured
            plain = load_config(config, [*user_overrides, "train.eval_every=0",
                                         f"train.eval_steps={TrainConfig().eval_steps}"])
        except ValueError:
            raise e from None
        d = plain.data
        if d.source == "indexed" and d.valid_path is None and (d.split is None or parse_split(d.split)[1] <= 0):
            raise ConfigError(f"{config}: no held-out data to evaluate on (data.valid_path unset, data.split "
                              f"{d.split!r} has no validation share): give --data PREFIX (an indexed dataset) or "
                              "--set data.split=98,2,0 (the validation share of data.path)") from None
        raise


def choose_checkpoint(cfg: Config, requested: Optional[str]) -> Path:
    """The checkpoint to evaluate, as ``checkpoint.resume`` resolves one (``latest`` is its ``auto``), newest
    first past damaged ones (``requested`` None: the run's newest, or before its first save what checkpoint.resume
    names); verified (manifest, sizes, small files' checksums) and of this config's model.
    Raises ConfigError (one line)."""
    root = checkpoint_root(cfg.checkpoint, cfg.run.dir)
    # by default what a restart of the run resumes: its own newest once it has one, else what checkpoint.resume names
    configured = "auto" if mf.list_checkpoints(root) else cfg.checkpoint.resume
    wanted = requested or (configured if configured not in ("auto", "none") else "latest")
    mode = "auto" if wanted == "latest" else wanted
    try:
        candidates, _ = resume_candidates(mode, root)
    except ValueError as e:
        raise ConfigError(str(e).replace("checkpoint.resume = ", "--checkpoint ", 1)) from None
    if not candidates:
        raise ConfigError(f"--checkpoint {wanted}: no step_N checkpoint under {root} (train first, or give --checkpoint "
                          "PATH: a step_N directory, a directory of them, or latest)")
    ckpt, body, damaged = newest_verified(candidates, f"--checkpoint {wanted}")
    if ckpt is None:
        problems = [f"{c.name}: {problem}" for c, problem in damaged]
        raise ConfigError(f"--checkpoint {wanted}: every checkpoint is damaged ({' | '.join(problems)})")
    check_model_shapes(cfg, ckpt, body)
    try:  # the model keys that change the function without changing a shape (rope_theta, norm_eps, ...)
        compat.check_config(ckpt, {"model": (body.get("config") or {}).get("model") or {}},
                            {"model": cfg.to_dict()["model"]}, cfg.checkpoint.allow_config_change)
    except compat.ResumeMismatchError as e:
        raise ConfigError(str(e).replace("resume refused", "evaluation refused", 1)) from None
    return ckpt.resolve()


def check_out_path(out: str) -> None:
    """``--out``: a file the result can be written to once the ranks are done (its directory exists; it is not a
    directory), checked before they start rather than failing after the evaluation. Raises ConfigError (one line)."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give a file name, e.g. --out {path / 'eval.json'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {out}: no directory {path.parent} to write it in (create it, or give another path)")


def check_evaluation_fits(cfg: Config, on_cuda: bool, ranks_per_host: int) -> None:
    """:func:`preflight.check_model_fits` for ``dist-train eval``: what its ranks hold of the parameters' states
    (``cost.memory.evaluation_state_bytes``: the weights alone, no gradients or optimizer state; under DeepSpeed in its
    dtype, ZeRO-3's partitions and persistent parameters: its engine is built without an optimizer), so a model whose
    weights fit is not refused for a training step's states it never holds."""
    prof, label = device_profile(on_cuda)
    sh, loc = rank_inputs(cfg, prof)
    held = evaluation_state_bytes(cfg, sh, loc)
    if cfg.parallel.zero_stage is None:
        counted, keys = ("an evaluation's fp32 weights alone, no gradients or optimizer state",
                         "parallel.tp, parallel.pp, parallel.fsdp")
    else:
        counted, keys = ("an evaluation's weights alone, in DeepSpeed's dtype (ZeRO-3: their partitions and the "
                         "persistent parameters), no gradients or optimizer state", "parallel.tp, parallel.zero_stage")
    refuse_beyond_memory(cfg, (prof, label), on_cuda, ranks_per_host, held, counted, keys)


def eval_preflight(cfg: Config, requested: Optional[str], on_cuda: bool, ranks_per_host: int) -> Path:
    """The launch pre-flight's checks that apply to an evaluation (no directory is written, so none must be
    writable) and the checkpoint -> the step directory to evaluate. ``on_cuda`` / ``ranks_per_host``: where the
    ranks will compute (``launchers.cli.ranks_on_cuda``; a batch job: its nodes). Raises ConfigError (one line)."""
    check_evaluation_fits(cfg, on_cuda, ranks_per_host=ranks_per_host)
    check_engine(cfg, on_cuda, forward_only=True)  # no backward: bf16 with tp > 1 on CPU is fine here
    check_data(cfg)  # includes the held-out data: there, and enough samples for train.eval_steps batches
    return choose_checkpoint(cfg, requested)
