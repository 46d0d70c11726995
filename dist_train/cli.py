"""``dist-train`` command line. Every subcommand has ``--help`` with an example.

Bad input (config errors, missing files, invalid values) prints one line on stderr and exits with 2.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import pkgutil
import sys
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from .bench import cli as bench_commands

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141


class _F(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and every option's help line ends with the default the command uses when the
    line does not say it already (an unset default — None, off, empty: the config's or nothing — is not shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []  # 0 == False
        if not action.option_strings or "default" in text or unset:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default {shown.replace('%', '%%')})".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """Argument errors are one line plus a pointer to ``--help`` (exit 2), not the whole usage text.
    Sub-command parsers inherit the class (``add_subparsers`` uses the parent's type)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts: '0' or '-2' is refused by the parser with the valid range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def examples(*lines: str) -> str:
    """An argparse epilog listing example commands (every CLI module uses this)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# ---------------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    try:
        from launchers.env import populate_rank_env
    except ImportError:
        populate_rank_env = None
    if populate_rank_env is not None:
        populate_rank_env()
    return import_command_module("dist_train.entry").run_rank(args.config, args.set or [])


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_indexed, python_stdlib_files

    if not args.input and not args.corpus:
        raise ValueError("data prepare: give --input FILE... or --corpus python-stdlib")
    inputs = [Path(p) for p in args.input or []]
    if args.corpus:
        if args.corpus != "python-stdlib":
            raise ValueError(f"--corpus {args.corpus!r}: valid values are python-stdlib")
        inputs += python_stdlib_files()
    info = prepare_indexed(inputs, args.output, args.tokenizer, args.eod_token)
    print(f"wrote {info['prefix']}.bin/.idx/.meta.json/.doc_hashes: {info['documents']:,} documents, "
          f"{info['tokens']:,} tokens, vocab {info['vocab_size']}, end-of-document id {info['eod_id']}")
    return 0


def _cmd_data_hash(args: argparse.Namespace) -> int:
    from .data.document_hashes import hash_dataset

    info = hash_dataset(args.prefix)
    print(f"wrote {info['path']}: {info['documents']:,} document hashes of {args.prefix}.bin")
    return 0


def _sentence(help_line: str) -> str:
    """A one-line ``help`` (lower case, as argparse lists it) as the start of a ``--help`` description."""
    return help_line[:1].upper() + help_line[1:]


def _add_run(sub) -> None:
    p = sub.add_parser("run", help=_HELP["run"], description=_sentence(_HELP["run"]) + ": the "
                       "per-rank command every launcher ends in (docs/launching.md).",
                       formatter_class=_F, epilog=examples(
                           "dist-train run configs/gpt_tiny.yaml --set parallel.dp=1 --set train.steps=10",
                           "torchrun --nproc-per-node 2 -m dist_train run configs/gpt_tiny.yaml --set parallel.dp=2",
                           "mpiexec -n 2 dist-train run configs/gpt_tiny.yaml"))
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=_cmd_run)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help=_HELP["data"], formatter_class=_F, epilog=examples(
        "dist-train data prepare --corpus python-stdlib --output data/pystd",
        "dist-train data prepare --input notes/*.txt corpus.jsonl --output data/corpus",
        "dist-train data hash data/megatron_corpus_text_document"))
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{prepare,hash}")
    q = dsub.add_parser("prepare", help="build a Megatron indexed dataset (.bin/.idx) from text/JSONL files",
                        formatter_class=_F, epilog=examples(
                            "dist-train data prepare --input notes/*.txt corpus.jsonl --output data/corpus",
                            "dist-train data prepare --corpus python-stdlib --output data/pystd",
                            "dist-train data prepare --input c.jsonl --tokenizer tok/tokenizer.json --eod-token '<|eot|>' "
                            "--output data/c"))
    q.add_argument("--input", nargs="+", metavar="PATH", help="text files (one document each) or JSONL ('text')")
    q.add_argument("--corpus", help="a built-in corpus: python-stdlib (this interpreter's standard library)")
    q.add_argument("--output", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx, the PREFIX.meta.json sidecar (tokenizer, vocab size, "
                        "end-of-document id, token digest) and PREFIX.doc_hashes (8 B per document: the pre-flight's "
                        "train/validation overlap check); never over an existing PREFIX.bin/.idx")
    q.add_argument("--tokenizer", default="byte", help="byte (default, no download) or path/to/tokenizer.json")
    q.add_argument("--eod-token", metavar="TOKEN", help="end-of-document token of a tokenizer.json (default: its "
                   "tokenizer_config.json eos_token, else </s>, <|endoftext|>, <|end_of_text|>, <eos>)")
    q.set_defaults(func=_cmd_data_prepare)
    h = dsub.add_parser("hash", help="write PREFIX.doc_hashes for a dataset that has none (built by Megatron-LM, or "
                        "prepared before the file existed)", formatter_class=_F, epilog=examples(
                            "dist-train data hash data/megatron_corpus_text_document"))
    h.add_argument("prefix", metavar="PREFIX", help="the dataset's PREFIX.bin/.idx; writes PREFIX.doc_hashes (8 B "
                   "per document), so the pre-flight reads it instead of hashing the .bin at every start")
    h.set_defaults(func=_cmd_data_hash)


def _bench_modules() -> dict[str, str]:
    """bench command name -> its torch-free module (flags, help, checks); dist_train/bench/__init__.py."""
    return {m.name: f"{bench_commands.__name__}.{m.name}" for m in pkgutil.iter_modules(bench_commands.__path__)
            if not m.name.startswith("_")}


def _run_bench(args: argparse.Namespace) -> int:
    """`dist-train bench NAME`: NAME's torch-free checks first (a refusal costs no torch import), then the
    measuring module dist_train.bench.NAME (torch and all it measures, imported at its top) is loaded by name
    and runs with what the checks returned. The one place a bench command is dispatched."""
    checked = importlib.import_module(_bench_modules()[args.bench_cmd]).check(args)
    return import_command_module(f"dist_train.bench.{args.bench_cmd}").run(args, checked)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help=_HELP["bench"], formatter_class=_F,
                       epilog=examples("dist-train bench attention --world-size 2 --seq-len 4096",
                                        "dist-train bench train configs/gpt_tiny.yaml"))
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    for name, modname in sorted(_bench_modules().items()):
        mod = importlib.import_module(modname)
        q = bsub.add_parser(name, help=getattr(mod, "HELP", name), formatter_class=_F)
        mod.add_arguments(q)
        q.set_defaults(func=_run_bench)


def _module_command(arguments: str, add: str, main: str) -> Callable:
    """A subcommand implemented in another package (launchers, checkpoint, planner): ``add`` of the module
    ``arguments`` defines its flags; ``main`` ("module:function") runs it and is imported only then, so that the
    command's ``--help`` and a refused flag import no more than ``arguments`` does (no torch)."""
    def fill(sub, name: str) -> None:
        p = sub.add_parser(name, help=_HELP[name], formatter_class=_F)
        getattr(importlib.import_module(arguments), add)(p)
        p.set_defaults(func=_deferred(main))
    return fill


def _deferred(main: str) -> Callable[[argparse.Namespace], int]:
    """``"module:function"`` -> a command function that imports ``module`` when called (one dispatch point for
    every command defined outside this file, as ``_run_bench`` is for the bench commands)."""
    module, function = main.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(import_command_module(module), function)(args)
    return run


#: True while ``main`` runs a command from the process's own command line (argv None): the heap is dist-train's
_OWN_PROCESS: ContextVar[bool] = ContextVar("dist_train_cli_own_process", default=False)


def import_command_module(module: str) -> ModuleType:
    """Import the module that runs a command: torch and what it pulls in (DCP, DTensor, dynamo, sympy: ~300k
    objects that live until the process exits), with the cyclic garbage collector paused meanwhile; one collection
    then frees the import's own garbage and what survives is frozen (``gc.freeze``).

    Why: the collector otherwise walks the growing heap again and again during the import, and the interpreter's
    final collections walk all of it again at exit. Every rank and launcher process pays that: 2.9 -> 2.1 s of CPU
    for importing ``dist_train.entry`` and exiting, a 2-rank local launch 9.4-10.4 -> 7.4-7.7 s of CPU
    (docs/benchmarks/launch.md). Nothing else changes: objects are still freed by reference count (module teardown
    at exit included), later garbage is collected as before, and only the frozen survivors are no longer examined
    for cycles. A module already imported (an in-process caller) is returned as it is, without collecting or
    freezing anything.

    Only a process that is dist-train's own (``main()`` reading the process's command line: the console script,
    ``python -m dist_train``, every rank) freezes: ``gc.freeze`` takes the whole heap, so a caller that passes
    ``main`` its arguments (a notebook, a test) would have every object it held then in a cycle never freed; its
    import is only paused and collected.
    """
    if module in sys.modules:
        return sys.modules[module]
    enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(module)
    finally:
        gc.collect()
        if _OWN_PROCESS.get():
            gc.freeze()
        if enabled:
            gc.enable()


# name -> one-line help; shown by `dist-train --help` without importing any command's module
_HELP = {
    "launch": "start the ranks (ray | local | mpi) and train",
    "run": "run one rank (under torchrun, mpiexec or a launcher) or a single process",
    "data": "prepare datasets",
    "bench": "benchmarks (attention, window, ckpt, train, launch, memory)",
    "ckpt": "inspect, verify and convert checkpoints",
    "submit": "write (and submit) a Slurm/PBS batch script",
    "plan": "predict memory and speed per layout and rank the layouts",
    "scale": "run a scaling sweep and report efficiency with plots",
    "plot": "plot loss and validation loss (and tokens/s, MFU, memory) of runs against step and tokens",
    "eval": "evaluate a checkpoint on held-out data (validation loss, perplexity) without training",
}
_COMMANDS: dict[str, Callable] = {
    "launch": _module_command("launchers.arguments", "add_launch_arguments", "launchers.cli:launch_main"),
    "run": lambda sub, name: _add_run(sub),
    "data": lambda sub, name: _add_data(sub),
    "bench": lambda sub, name: _add_bench(sub),
    "ckpt": _module_command("dist_train.checkpoint_arguments", "add_arguments", "dist_train.checkpoint.cli:run"),
    "submit": _module_command("launchers.arguments", "add_submit_arguments", "launchers.cli:submit_main"),
    "plan": _module_command("dist_train.plan.cli", "add_plan_arguments", "dist_train.plan.cli:plan_main"),
    "scale": _module_command("dist_train.plan.cli", "add_scale_arguments", "dist_train.plan.cli:scale_main"),
    "plot": _module_command("dist_train.plot", "add_arguments", "dist_train.plot:run"),
    "eval": _module_command("launchers.arguments", "add_eval_arguments", "launchers.evaluate:eval_main"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The CLI parser. Only ``command``'s module is imported and its arguments built (all when None
    is not wanted: `dist-train --help` stays fast because torch is never imported for it)."""
    parser = ArgumentParser(
        prog="dist-train", formatter_class=_F,
        description="Distributed long-context training: context (ring/Ulysses) and window parallelism "
                    "composed with tensor, pipeline and ZeRO data parallelism on one device mesh.",
        epilog=examples("dist-train launch configs/demo.yaml",
                         "dist-train launch configs/gpt_tiny.yaml --backend local --set parallel.dp=1 --set parallel.cp=2",
                         "dist-train run configs/gpt_tiny.yaml --set parallel.dp=1", "dist-train <command> --help"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fill in _COMMANDS.items():
        if name == command:
            fill(sub, name)
        else:
            sub.add_parser(name, help=_HELP[name])
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's ``--help`` opens with what it does: a parser without its own description gets the
    one-line help its parent lists it with."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                if not child.description and helps.get(name):
                    child.description = _sentence(helps[name]) + "."
                _describe(child)


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command; a reader that closes the pipe early (``dist-train ckpt inspect … | head``) ends it
    quietly with status 141 (128 + SIGPIPE, what a shell reports for a killed writer), no traceback."""
    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # a closed pipe surfaces here rather than in the interpreter's exit
    except BrokenPipeError:
        # stdout is gone: point it at /dev/null so the interpreter's final flush has nowhere to fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _dispatch(argv: Optional[list[str]]) -> int:
    owner = _OWN_PROCESS.set(argv is None)
    try:
        return _run_command(sys.argv[1:] if argv is None else list(argv))
    finally:
        _OWN_PROCESS.reset(owner)


#: words a person reaches for that are another command's job (an unknown command is one line naming the right one)
_MEANT = {"sweep": "scale", "train": "launch", "evaluate": "eval", "checkpoint": "ckpt", "checkpoints": "ckpt",
          "prepare": "data", "convert": "ckpt", "inspect": "ckpt", "verify": "ckpt", "predict": "plan",
          "calibrate": "plan", "sbatch": "submit", "qsub": "submit"}


def _run_command(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _MEANT:
        meant = _MEANT[command]
        print(f"dist-train: error: no command {command!r}: did you mean `dist-train {meant}` ({_HELP[meant]})? "
              f"(see dist-train {meant} --help)", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser(command if command in _COMMANDS else None)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except ValueError as e:  # includes ConfigError: bad user input
        print(f"dist-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"dist-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dist-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
