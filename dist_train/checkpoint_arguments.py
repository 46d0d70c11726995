"""The flags, help and examples of ``dist-train ckpt inspect|verify|convert``, without torch (the checkpoint
package imports it): ``--help`` and a refused flag cost no torch import; :mod:`dist_train.checkpoint.cli` runs
the action.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n"
                     "  dist-train ckpt inspect runs/demo/checkpoints\n"
                     "  dist-train ckpt verify runs/demo/checkpoints/step_120\n"
                     "  dist-train ckpt convert runs/demo/checkpoints --to hf hf_out\n"
                     "  dist-train ckpt convert hf_out --from hf runs/init && "
                     "dist-train run cfg.yaml --set checkpoint.resume=runs/init\n"
                     "  dist-train ckpt convert runs/demo/checkpoints --to dcp stock_dcp\n"
                     "  dist-train ckpt convert stock_dcp --from dcp runs/init --config cfg.yaml")
    sub = parser.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    fmt = getattr(parser, "formatter_class", argparse.HelpFormatter)
    p = sub.add_parser("inspect", help="table of tensors, shapes, dtypes, bytes, saved layout, step",
                       formatter_class=fmt, epilog="examples:\n  dist-train ckpt inspect runs/demo/checkpoints/step_120\n"
                              "  dist-train ckpt inspect runs/demo/checkpoints --all --json table.json")
    p.add_argument("path", type=Path, help="step_N directory, or a checkpoint directory (newest complete one)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON (every tensor)")
    p.add_argument("--all", action="store_true",
                   help="list every optimizer tensor too (default: one line per kind of optimizer state)")
    p = sub.add_parser("verify", help="check completeness and checksums; exit 1 naming the bad file/tensor",
                       formatter_class=fmt, epilog="example:\n  dist-train ckpt verify runs/demo/checkpoints")
    p.add_argument("path", type=Path, help="step_N directory, or a checkpoint directory (all checkpoints in it)")
    p = sub.add_parser("convert", help="to Hugging Face Llama/Mistral, stock DCP or a torch.save file; from Hugging Face or stock DCP",
                       formatter_class=fmt,
                       epilog="examples:\n  dist-train ckpt convert runs/demo/checkpoints/step_120 --to hf hf_out\n"
                              "  dist-train ckpt convert hf_out --from hf runs/init\n"
                              "  dist-train ckpt convert runs/demo/checkpoints --to dcp stock_dcp   "
                              "# dcp.load(model.state_dict(), checkpoint_id='stock_dcp')\n"
                              "  dist-train ckpt convert runs/demo/checkpoints --to torch model.pt\n"
                              "  dist-train ckpt convert stock_dcp --from dcp runs/init --config cfg.yaml")
    p.add_argument("src", type=Path, help="checkpoint (with --to), HF model directory or stock DCP directory (--from)")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf", "dcp", "torch"],
                           help="hf: an HF directory; dcp: a stock DCP directory; torch: one torch.save file "
                                "(the model state dict)")
    direction.add_argument("--from", dest="from_", choices=["hf", "dcp"],
                           help="write a dist-train checkpoint (step 0, weights only) from an HF directory or a "
                                "stock DCP model state dict")
    p.add_argument("out", type=Path, help="output directory (output file with --to torch)")
    p.add_argument("--config", help="with --from dcp: the run's YAML config; the tensors must be its model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a --config key (repeatable)")
    p.add_argument("--input-normalisation-from-data", action="store_true",
                   help="with --from dcp of a Swin without input_normalisation.json (which --to dcp writes): record "
                        "none, so the run normalises the inputs with its own data's training-share statistics and "
                        "says so; without this flag such an import is refused")
