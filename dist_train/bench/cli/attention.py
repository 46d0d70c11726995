"""`dist-train bench attention`: its flags, examples and the checks that need no torch (the measurement:
dist_train/bench/attention.py; the layout and method names are checked there, against parallelism.context)."""
from __future__ import annotations

import argparse
from typing import Optional

HELP = "context-parallel attention: efficiency, critical path, imbalance vs single-process attention"
EPILOG = """example:
  dist-train bench attention --world-size 2 --seq-len 16384 --layout zigzag --method ring --json out.json
  dist-train bench attention --world-size 4 --seq-len 8192 --layout contiguous,striped,zigzag
  dist-train bench attention --world-size 4 --seq-len 8192 --layout contiguous,striped,zigzag --simulate
  dist-train bench attention --world-size 4 --seq-len 8192 --block-kernels --repeats 7
  dist-train bench attention --world-size 4 --seq-len 8192 --layout zigzag --kv-piece none,512 --repeats 1
  dist-train bench attention --world-size 2 --seq-len 32768 --layout zigzag,striped --docs 8 --simulate --png docs.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--world-size", type=int, default=2, help="number of ranks P (default 2)")
    parser.add_argument("--seq-len", type=int, default=8192, help="global sequence length S")
    parser.add_argument("--layout", default="zigzag", help="comma list of contiguous,striped,zigzag")
    parser.add_argument("--method", default="ring", help="comma list of ring,ulysses,hybrid")
    parser.add_argument("--ulysses-degree", type=int, default=1, help="U for --method hybrid")
    parser.add_argument("--heads", type=int, default=8, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=None, help="K/V heads (default: H)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--batch", type=int, default=1, help="sequences per call B")
    parser.add_argument("--window", type=int, default=None, help="sliding window w (default: none)")
    parser.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    parser.add_argument("--forward-only", action="store_true", help="time forward only (default fwd+bwd)")
    parser.add_argument("--kernel", default="auto", help="auto, sdpa or math")
    parser.add_argument("--kv-piece", default="none",
                        help="comma list of K/V piece sizes in tokens for the ring (none = whole shards), "
                             "e.g. none,512: one record per value")
    parser.add_argument("--docs", type=int, default=None,
                        help="pack N equal documents into S (document masking) and compare with the same S "
                             "unmasked, against the ideal speed-up S^2 / sum(L_i^2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations (median reported)")
    parser.add_argument("--block-kernels", action="store_true",
                        help="only time the local kernel on the block shapes the layouts use at n=S/P "
                             "(full n×n, causal n, half blocks, causal n/2): useful GFLOP/s per shape")
    parser.add_argument("--simulate", action="store_true",
                        help="run the P ranks' ring schedule in one process (critical path without "
                             "oversubscription; method ring only; no wall time or memory)")
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    parser.add_argument("--png", default=None,
                        help="with --docs: bar chart of the packed speed-up per layout against the ideal")


def _piece(value: str) -> Optional[int]:
    """'none' -> None (whole shards), else a positive token count."""
    if value.strip().lower() == "none":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"--kv-piece {value!r} must be 'none' or a positive number of tokens")
    return int(value)


def check(args: argparse.Namespace) -> list[Optional[int]]:
    """The ``--kv-piece`` values (None: whole shards); ValueError on a count, piece, ``--docs`` or ``--png``
    the bench cannot use."""
    if args.world_size < 1:
        raise ValueError(f"--world-size {args.world_size} must be >= 1")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be >= 1")
    pieces = [_piece(p) for p in args.kv_piece.split(",")]
    if args.docs is not None and not 1 <= args.docs <= args.seq_len:
        raise ValueError(f"--docs {args.docs} must be between 1 and --seq-len {args.seq_len}")
    if args.png and not args.docs:  # before the measurements, not after them
        raise ValueError("--png needs --docs N: no packed-document record to plot")
    return pieces
