"""`dist-train bench memory`: its flags, examples and argument checks, torch-free (the measurement:
dist_train/bench/memory.py)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

HELP = "peak memory per rank, bytes/token and s/step of GPT training over a sweep of sequence lengths"
EPILOG = """example:
  dist-train bench memory --seq-lens 32768,65536,131072 --cp 2,1 --window 2048 --json mem.json \\
      --csv mem.csv --png mem.png
  dist-train bench memory --seq-lens 32768 --cp 2 --vocab 8192 --loss-chunk auto,full --steps 3
  dist-train bench memory --seq-lens 262144 --cp 2 --extend mem.json --json mem2.json --png mem2.png
  dist-train bench memory --seq-lens 8192 --cp 1 --checkpointing none --precision bf16 --steps 3
  (cp=1 runs one rank; a cp=2 point runs 2 ranks of one thread each: on 2 cores they do not compete)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--seq-lens", default="32768,65536,131072,262144,524288,1048576",
                        help="comma list of global sequence lengths S")
    parser.add_argument("--cp", default="2,1", help="comma list of context-parallel sizes (ranks per point)")
    parser.add_argument("--window", type=int, default=2048, help="sliding attention window (tokens; 0: full causal)")
    parser.add_argument("--d-model", type=int, default=128, help="model width d")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="K/V heads (GQA)")
    parser.add_argument("--vocab", type=int, default=257, help="vocabulary size (257: the byte tokenizer)")
    parser.add_argument("--kv-piece", type=int, default=4096, help="ring K/V piece in tokens (0: whole shards)")
    parser.add_argument("--loss-chunk", default="auto",
                        help="comma list of train.loss_chunk values (auto, full or tokens): one record each")
    parser.add_argument("--checkpointing", default="full", choices=("none", "full", "selective"),
                        help="train.activation_checkpointing")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="train.precision (bf16: torch.autocast with fp32 parameters, the DDP engine's)")
    parser.add_argument("--steps", type=int, default=1,
                        help="timed steps per point and loss setting after the memory step (0: report the memory "
                             "step's own time)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per point before its ranks are killed")
    parser.add_argument("--extend", default=None, metavar="JSON",
                        help="a previous run's --json: its records are kept (points measured again replace "
                             "them) and summarised and plotted with this run's, to extend a sweep in parts")
    parser.add_argument("--json", default=None, help="write the records and summary as JSON")
    parser.add_argument("--csv", default=None, help="write one row per point as CSV")
    parser.add_argument("--png", default=None, help="plot bytes/token, peak memory and s/step against S")


def _ints(value: str, name: str) -> list[int]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items or not all(v.isdigit() and int(v) > 0 for v in items):
        raise ValueError(f"--{name} {value!r}: expected a comma list of positive integers, e.g. 32768,65536")
    return [int(v) for v in items]


def _loss_chunks(value: str) -> list[Any]:
    out: list[Any] = []
    for v in (x.strip() for x in value.split(",") if x.strip()):
        if v in ("auto", "full"):
            out.append(v)
        elif v.isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise ValueError(f"--loss-chunk {value!r}: each value must be auto, full or a positive token count")
    if not out:
        raise ValueError("--loss-chunk: empty; valid: auto, full or a positive token count")
    return out


def _previous_records(path: str) -> list[dict]:
    """Records of an earlier ``--json`` (for ``--extend``); one clear error when it is not one."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        records = data["records"]
        fields = ("seq_len", "cp", "loss_chunk", "peak_bytes_per_rank", "bytes_per_token", "step_s")
        missing = sorted({f for r in records for f in fields if f not in r})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--extend {path}: not a 'dist-train bench memory --json' file ({e})") from None
    if missing:
        raise ValueError(f"--extend {path}: records lack {', '.join(missing)}; not a 'dist-train bench memory --json' file")
    return records


@dataclass(frozen=True)
class Sweep:
    """The points to measure, parsed from the flags, and the records an ``--extend`` file brings along."""
    cps: list[int]
    seq_lens: list[int]
    loss_chunks: list[Any]
    previous: list[dict]


def check(args: argparse.Namespace) -> Sweep:
    """The sweep of ``args``; ValueError on a step count, list, sequence length or ``--extend`` file the bench
    cannot use."""
    if args.steps < 0:
        raise ValueError(f"--steps {args.steps}: must be >= 0")
    cps, seq_lens, chunks = _ints(args.cp, "cp"), _ints(args.seq_lens, "seq-lens"), _loss_chunks(args.loss_chunk)
    for cp in cps:
        for s in seq_lens:
            if s % (2 * cp):
                raise ValueError(f"--seq-lens: {s} is not a multiple of 2·cp = {2 * cp} (zigzag shards)")
    return Sweep(cps, seq_lens, chunks, _previous_records(args.extend) if args.extend else [])
