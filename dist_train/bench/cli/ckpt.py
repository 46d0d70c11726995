"""`dist-train bench ckpt`: its flags, examples and argument checks, torch-free (the measurement:
dist_train/bench/ckpt.py; with ``--engine``, dist_train/bench/_ckpt_engines.py)."""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...config import config_from_dict
from ...cost.flops import model_params

HELP = ("checkpoint save/load throughput vs raw disk bandwidth, async stall vs sync; with --engine: engine "
        "checkpoints (FSDP2 x tp, ZeRO) vs the engine's usual save/load, time and memory per rank")
EPILOG = """examples:
  dist-train bench ckpt --size-gb 1
  dist-train bench ckpt --size-gb 2 --dir /scratch --repeats 3 --json ckpt.json
  dist-train bench ckpt --engine fsdp2-dp2-tp2,zero2-dp2,zero3-dp2 --repeats 5 --json e.json --csv e.csv --png e.png
  dist-train bench ckpt --engine zero2-offload-dp2 --d-model 512 --layers 4
  dist-train bench ckpt --engine fsdp2-dp2-tp2 --fsdp-baseline dcp --repeats 5

--engine LAYOUT[,...] measures, per rank of each layout (gloo ranks on CPU), save and load time, peak extra CPU
memory (tensors and resident set) and bytes written, of our gather-free checkpoints and of the engine's usual
path in the same ranks: FSDP2 -> torch DCP full_state_dict gather + torch.save; ZeRO -> DeepSpeed's own
save_checkpoint/load_checkpoint (--fsdp-baseline dcp: FSDP2 -> torch DCP's own sharded save/load). Layouts: """

#: --engine layouts: name -> (the config's parallel section, ranks)
LAYOUTS = {
    "fsdp2-dp2-tp2": ({"fsdp": True, "dp": 2, "tp": 2}, 4),
    "fsdp2-dp2": ({"fsdp": True, "dp": 2}, 2),
    "zero1-dp2": ({"dp": 2, "zero_stage": 1}, 2),
    "zero2-dp2": ({"dp": 2, "zero_stage": 2}, 2),
    "zero3-dp2": ({"dp": 2, "zero_stage": 3}, 2),
    # the host steps the partitions with our torch AdamW (no DeepSpeedCPUAdam build)
    "zero2-offload-dp2": ({"dp": 2, "zero_stage": 2,
                           "deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}},
                                         "zero_force_ds_cpu_optimizer": False}}, 2),
}


#: the small GPT of the checkpoint memory tests (tests/test_fsdp_training.py, test_ckpt_engines.py); --engine's
#: --d-model, --layers and --vocab replace its sizes
TEST_MODEL = {"d_model": 256, "n_layers": 2, "ffn_hidden": 512, "vocab_size": 95}


def engine_config(parallel: dict, model: Optional[dict] = None) -> dict:
    """The config (a dict) of the GPT measured under ``parallel``: ``model``'s d_model, n_layers, ffn_hidden,
    vocab_size over :data:`TEST_MODEL` (an odd vocabulary, which tp pads), 4 heads and 2 KV heads."""
    return {"model": {"kind": "gpt", "n_heads": 4, "n_kv_heads": 2, **TEST_MODEL, **(model or {})},
            "data": {"seq_len": 16}, "parallel": parallel, "train": {"global_batch": 2, "micro_batch": 1}}


def engine_model(args: argparse.Namespace) -> dict:
    """The model sizes ``--d-model``, ``--layers`` and ``--vocab`` give :func:`engine_config` (ffn 4x d_model)."""
    return {"d_model": args.d_model, "n_layers": args.layers, "ffn_hidden": 4 * args.d_model,
            "vocab_size": args.vocab}


#: bytes per parameter the two paths of one round leave on disk at most: ours 12 (fp32 weights, two AdamW moments),
#: DeepSpeed's ZeRO-1/2 checkpoint 16 (the same, plus rank 0's module weights)
ROUND_BYTES_PER_PARAM = 12 + 16


#: --fsdp-baseline: what an FSDP2 layout's ours is compared with (ZeRO layouts: DeepSpeed's own checkpoint)
FSDP_BASELINES = ("full", "dcp")


@dataclass(frozen=True)
class EngineRun:
    """What ``--engine`` chose: the layouts to measure, in order, and the FSDP2 layouts' baseline
    (:data:`FSDP_BASELINES`)."""
    layouts: list[str]
    fsdp_baseline: str = "full"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG + ", ".join(LAYOUTS)
    parser.add_argument("--size-gb", type=float, default=None,
                        help="model state size in GiB (default 1; not with --engine, whose model is a GPT)")
    parser.add_argument("--dir", default=".", help="directory on the disk to measure (default: current dir)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--io-threads", type=int, default=2,
                        help="threads reading/writing shard bytes per rank (default 2)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--engine", metavar="LAYOUT[,LAYOUT...]",
                        help=f"engine checkpoints instead of raw throughput; layouts: {', '.join(LAYOUTS)}")
    parser.add_argument("--d-model", type=int, default=384, help="--engine: GPT width (ffn 4x; default 384)")
    parser.add_argument("--layers", type=int, default=4, help="--engine: GPT layers (default 4)")
    parser.add_argument("--vocab", type=int, default=8191, help="--engine: vocabulary (default 8191: odd, tp pads it)")
    parser.add_argument("--csv", metavar="PATH", help="--engine: one row per (layout, path, rank) as CSV")
    parser.add_argument("--png", metavar="PATH", help="--engine: plot time and peak memory, ours vs baseline")
    parser.add_argument("--no-verify", action="store_true", help="--engine: load our checkpoints without checking "
                        "their checksums (a resume checks them; this shows what that costs)")
    parser.add_argument("--fsdp-baseline", choices=FSDP_BASELINES, default="full",
                        help="--engine, FSDP2 layouts: the baseline — full: DCP full_state_dict gathered + torch.save "
                        "(one file per tp rank; default); dcp: torch DCP's own sharded dcp.save/dcp.load (no gather, "
                        "no checksums: what ours adds to it)")
    parser.add_argument("--timeout", type=float, default=600.0, help="--engine: seconds per layout before its "
                        "ranks are killed (default 600)")


def _engine_run(args: argparse.Namespace) -> EngineRun:
    names = [n.strip() for n in args.engine.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if not names or unknown:
        raise ValueError(f"--engine {args.engine!r}: unknown layout {unknown[0] if unknown else '(none)'}; valid: "
                         f"{', '.join(LAYOUTS)}")
    if args.size_gb is not None:
        raise ValueError(f"--size-gb = {args.size_gb} with --engine: the engine mode's model is a GPT sized by "
                         "--d-model, --layers and --vocab")
    for flag in ("d_model", "layers", "vocab"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} = {getattr(args, flag)}: must be >= 1")
    if args.d_model % 4:
        raise ValueError(f"--d-model = {args.d_model}: must be a multiple of 4 (the GPT's 4 heads)")
    layouts = list(dict.fromkeys(names))
    if args.fsdp_baseline != "full" and not any(LAYOUTS[n][0].get("fsdp") for n in layouts):
        raise ValueError(f"--fsdp-baseline {args.fsdp_baseline}: no FSDP2 layout in --engine {args.engine!r} (the "
                         "ZeRO layouts' baseline is DeepSpeed's own checkpoint); add one, e.g. fsdp2-dp2-tp2")
    # every round's checkpoints (warm-up, repeats, tensor meter) stay until the layout ends (no pruning inside a
    # timed save), then are removed
    model = engine_model(args)
    need = max((args.repeats + 2) * ROUND_BYTES_PER_PARAM * model_params(config_from_dict(
        engine_config(LAYOUTS[n][0], model))) for n in layouts)
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise ValueError(f"--dir = {args.dir}: --engine {','.join(layouts)} with --repeats {args.repeats} writes up to "
                         f"{need / 2**30:.1f} GiB there at once, {free / 2**30:.1f} GiB available; use another --dir, "
                         "fewer --repeats or a smaller model")
    return EngineRun(layouts, args.fsdp_baseline)


def check(args: argparse.Namespace) -> "int | EngineRun":
    """``--engine``: the layouts to measure; else the model state's size in bytes. ValueError on a size, count,
    layout or directory the bench cannot use (one without room for the files it writes)."""
    if args.repeats < 1:
        raise ValueError(f"--repeats = {args.repeats}: must be >= 1")
    if args.io_threads < 1:
        raise ValueError(f"--io-threads = {args.io_threads}: must be >= 1")
    base = Path(args.dir)
    if not base.is_dir():
        raise ValueError(f"--dir = {args.dir}: not a directory")
    if args.engine is not None:
        return _engine_run(args)
    if args.no_verify:
        raise ValueError("--no-verify is for the --engine mode (the raw-disk mode times both loads)")
    if args.fsdp_baseline != "full":
        raise ValueError(f"--fsdp-baseline {args.fsdp_baseline} is for the --engine mode")
    for flag in ("csv", "png"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} is written by the --engine mode only")
    size_gb = 1.0 if args.size_gb is None else args.size_gb
    if not size_gb > 0:
        raise ValueError(f"--size-gb = {size_gb}: must be a positive number of GiB, e.g. --size-gb 1")
    nbytes = int(size_gb * (1 << 30))
    free = shutil.disk_usage(base).free
    if free < 5.2 * nbytes:  # raw file + two new-file raw writes + two checkpoints (keep_last=1 + the new one)
        raise ValueError(f"--size-gb = {size_gb}: needs ~{5.2 * nbytes / 2**30:.1f} GiB free in {base}, "
                         f"{free / 2**30:.1f} GiB available")
    return nbytes
