"""``dist-train eval``'s flags (torch-free: ``dist-train eval --help`` and a refused flag import nothing more).

Its parser is :func:`launchers.arguments.add_eval_arguments` (these flags and launch's ``--backend``, ``--nproc``...).
The command itself runs in :mod:`launchers.evaluate` (pre-flight, ranks) and :mod:`dist_train.checkpoint_eval`
(what each rank does)."""
from __future__ import annotations

import argparse
import textwrap
from typing import Optional

from .cli import examples, positive_int

#: set in every eval rank's environment: the scratch directory of this evaluation (its presence makes the process
#: a rank rather than the launcher; ``dist-train submit --eval``'s srun/mpiexec ranks: the job dir)
EVAL_RANK_ENV = "DIST_TRAIN_EVAL_RANK"

DESCRIPTION = (
    "Evaluate a checkpoint on held-out data without training: the config's model and parallel layout (its ranks "
    "started as `dist-train launch` starts them: --backend local|mpi|ray, --nproc, --nodes, --address, "
    "--gpus-per-node or their launch.* keys; never restarted; on a Slurm/PBS cluster: dist-train submit --eval), "
    "the checkpoint's weights only (no optimizer "
    "state), the validation loss of train.eval_steps batches (--batches) of data.valid_path (--data) or the "
    "validation share of data.split -- the same batches, and so the number the trainer logs as valid_loss at "
    "that step (bit for bit on the trained layout, within float rounding on another). Rank 0's result is one "
    "line (loss, perplexity, tokens, time) and, with --out, a JSON file. "
    "Read-only: nothing is written under run.dir or its checkpoints, and the run-dir lock is not taken, so a "
    "job training in that run dir keeps running (a checkpoint it prunes while being read fails this command "
    "with one line; evaluate a step it keeps, or a copy). Bad input (no checkpoint, no validation data, a "
    "checkpoint of another model size) is one line and exit 2 before any rank starts.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = textwrap.fill(DESCRIPTION, 100)  # the formatter keeps descriptions as written
    p.epilog = examples(
        "dist-train eval configs/gpt_tiny.yaml --data data/heldout",
        "dist-train eval configs/gpt_tiny.yaml --checkpoint runs/gpt_tiny/checkpoints/step_30 --data data/heldout "
        "--out eval.json",
        "dist-train eval configs/gpt_tiny.yaml --set parallel.dp=1 --set parallel.cp=2 --data data/heldout --batches 8",
        "dist-train eval configs/gpt_tiny.yaml --checkpoint runs/init --set parallel.dp=1 --set data.split=98,2,0",
        "dist-train eval configs/gpt_tiny.yaml --backend mpi --data data/heldout --out eval.json",
        "dist-train eval configs/swin_weather.yaml --set data.split=90,10,0 --batches 2"
        "   # a Swin trained with that split: the MSE of its last time steps")
    p.add_argument("config", help="YAML config file (the model and layout to evaluate under)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    add_evaluation_arguments(p)


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """What to evaluate on which data, and where the result goes: ``dist-train eval`` and ``dist-train submit
    --eval``."""
    p.add_argument("--checkpoint", metavar="PATH|latest",
                   help="a step_N directory, a directory of them (its newest), or latest: the newest under the run's "
                        "checkpoint dir (default: latest; a run with no checkpoint yet: what checkpoint.resume names, e.g. an "
                        "import)")
    p.add_argument("--data", metavar="PREFIX", help="held-out indexed dataset (sets data.valid_path)")
    p.add_argument("--batches", type=positive_int, metavar="N",
                   help="evaluation batches of train.global_batch samples (sets train.eval_steps)")
    p.add_argument("--out", metavar="FILE.json", help="also write the result as JSON there")


def eval_overrides(cfg_overrides: list[str], data: Optional[str], batches: Optional[int]) -> list[str]:
    """The ``--set`` list the ranks load the config with: the user's, then what --data/--batches set. Validation
    is switched on (train.eval_every, unless the user set it) since the config accepts data.valid_path and
    train.eval_steps only then and the pre-flight checks the held-out data only then; nothing else reads it here."""
    out = list(cfg_overrides)
    if not any(item.split("=", 1)[0].strip() == "train.eval_every" for item in out):
        out.append("train.eval_every=1")
    if data:
        out.append(f"data.valid_path={data}")
    if batches:
        out.append(f"train.eval_steps={batches}")
    return out
