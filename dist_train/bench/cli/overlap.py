"""`dist-train bench overlap`: its flags, example and argument checks, torch-free (the measurement:
dist_train/bench/overlap.py)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = ("pre-flight cost of the held-out/training document overlap check on a synthetic corpus (with "
        "PREFIX.doc_hashes, and hashed from the .bin) against the dataset checks it runs beside; for datasets built "
        "elsewhere (no sidecar, no file), the checks and the overlap check in one read of each .bin against two")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  dist-train bench overlap --train-docs 2000000 --valid-docs 20000 --mean-tokens 128 "
                     "--repeats 3 --json overlap.json")
    parser.add_argument("--train-docs", type=int, default=2_000_000, help="training documents (default 2,000,000)")
    parser.add_argument("--valid-docs", type=int, default=20_000, help="held-out documents (default 20,000)")
    parser.add_argument("--mean-tokens", type=int, default=128,
                        help="mean document length in tokens, uniform in [2, 2·mean) (default 128)")
    parser.add_argument("--overlap", type=float, default=0.01,
                        help="fraction of held-out documents copied from the training set (default 0.01)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--dir", default=None, help="where the two datasets are written (default: a temp dir)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def check(args: argparse.Namespace) -> int:
    """The bytes the two datasets take; ValueError (one line) on a count, fraction or directory the bench cannot
    use."""
    for flag, value in (("--train-docs", args.train_docs), ("--valid-docs", args.valid_docs),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag} = {value}: must be >= 1")
    if args.mean_tokens < 2:
        raise ValueError(f"--mean-tokens = {args.mean_tokens}: must be >= 2 (every document ends with its EOD)")
    if not 0 <= args.overlap <= 1:
        raise ValueError(f"--overlap = {args.overlap}: must be a fraction in [0, 1]")
    copies = round(args.overlap * args.valid_docs)  # each a distinct training document
    if copies > args.train_docs:
        raise ValueError(f"--overlap {args.overlap} of --valid-docs {args.valid_docs:,} plants {copies:,} copies of "
                         f"distinct training documents, more than --train-docs {args.train_docs:,}")
    # uint16 tokens + the index (12 B per document + 8) + the hash file (8 B per document), both datasets
    docs = args.train_docs + args.valid_docs
    nbytes = 2 * docs * args.mean_tokens + 28 * docs
    base = Path(args.dir) if args.dir else None
    if base is not None and not base.is_dir():
        raise ValueError(f"--dir = {args.dir}: not a directory")
    free = shutil.disk_usage(base or "/tmp").free
    if free < 1.2 * nbytes:
        raise ValueError(f"the two datasets need ~{nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free in "
                         f"{base or '/tmp'}; give --dir elsewhere or fewer --train-docs")
    return nbytes
