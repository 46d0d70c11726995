"""Every concrete example command — in each ``--help`` epilog, README.md, docs/*.md and the configs' header
comments — parses with the real
parser, and the config it names, with its ``--set`` overrides, passes validation and the command's own checks
(launch: the rank count; submit: the batch script's world size; bench train: run and baseline; plan: the
planned config; scale: the sweep's points), also behind a launcher prefix (`ray job submit --`, `mpiexec -n N`,
`srun`, `torchrun --nproc-per-node N -m dist_train`: with N, the config's world size must be N). A new user
copies these; none may end in an error.

In-process and config-only: nothing is started, trained or written (a subprocess per example would cost
seconds of imports each). Shared flags a page defines (`M="--set …"`) are substituted for $M; examples with
placeholders (CONFIG, N, Z, …, [optional flags], a|b) are skipped.
"""
from __future__ import annotations

import argparse
import re
import shlex

import pytest

from dist_train.bench.cli import train as bench_train
from dist_train.cli import _COMMANDS, ArgumentParser, _F, build_parser, main
from dist_train.config import load_config
from dist_train.eval_arguments import eval_overrides
from dist_train.plan.cli import _plan_config
from dist_train.plan.sweep import expand, load_sweep, point_config
from launchers.cli import resolve_launch, submit_main
from tests.trainer_utils import REPO

_PLACEHOLDER = re.compile(r"CONFIG|SWEEP|RUN_DIR|PREFIX|FILES|HEAD\b|\$|…|\[(?!\d)|\||<|[=\s][A-Z](?=[\s.]|$)")


def _parsers():
    for name in _COMMANDS:
        stack = [build_parser(name)]
        while stack:
            parser = stack.pop()
            yield parser
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())


# what starts the per-rank command in an example: `ray job submit … -- `, `mpiexec -n N `, `srun `, `torchrun
# --nproc-per-node N -m dist_train `, `python -m dist_train ` (with N, the ranks the config must have)
_LAUNCHED = re.compile(r"(?:ray job submit\b.*?\s--\s+|mpiexec -n (?P<n>\d+)\s+|srun\s+"
                       r"|torchrun\b.*?--nproc[-_]per[-_]node[ =](?P<t>\d+).*?\s(?P<m>-m dist_train\s+)"
                       r"|python3? (?P<p>-m dist_train(?:\.cli)?\s+))")


def _as_dist_train(part: str) -> tuple[str, int | None]:
    """``part`` as the ``dist-train …`` command it runs, and the rank count its launcher prefix fixes (or None)."""
    m = _LAUNCHED.match(part)
    if not m:
        return part, None
    rest = part[m.end():]
    n = m.group("n") or m.group("t")
    return ("dist-train " + rest if m.group("m") or m.group("p") else rest), (int(n) if n else None)


def _commands(text: str):
    """The ``dist-train …`` commands in ``text`` (also behind a launcher prefix, kept): continuation lines
    joined, ``a && b`` split, comments cut."""
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        for part in line.split("&&"):
            part = re.split(r"\s#\s|\s{2,}#", part.strip())[0].strip()
            if _as_dist_train(part)[0].startswith("dist-train ") and not _PLACEHOLDER.search(part):
                yield part


def _examples() -> list[tuple[str, str]]:
    found = {("--help", cmd) for p in _parsers() for cmd in _commands(p.epilog or "")}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs").glob("*/*.md"))]:
        source = doc.read_text()
        # shared flags a page defines once (`M="--set …"`) and its commands use as $M
        shared = dict(re.findall(r"\b([A-Z])=\"([^\"]*)\"", source))
        # fenced blocks are examples; an inline span is one when it names a shipped config (prose also says
        # `dist-train plot` for the command itself)
        for m in re.finditer(r"```[a-z]*\n(.*?)```|`([^`]*dist-train [^`]*configs/[^`]*)`", source, re.S):
            text = m.group(1) if m.group(1) is not None else m.group(2).replace("\n", " ")
            text = re.sub(r"\$([A-Z])\b", lambda v: shared.get(v.group(1), v.group(0)), text)
            found |= {(str(doc.relative_to(REPO)), cmd) for cmd in _commands(text)}
    # a shipped config's header comment says how to run it
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        comments = "\n".join(line.lstrip("# ") for line in config.read_text().splitlines() if line.startswith("#"))
        found |= {(str(config.relative_to(REPO)), cmd) for cmd in _commands(comments)}
    return sorted(found)


EXAMPLES = _examples()


def test_the_examples_are_found():
    assert len(EXAMPLES) > 50 and ("--help", "dist-train launch configs/demo.yaml") in EXAMPLES


def _check_config_of(args: argparse.Namespace, argv: list[str], capsys) -> None:
    command = argv[0]
    if command == "launch":
        resolve_launch(args)
    elif command == "submit" and args.eval:  # its checkpoint is chosen at submission: the config as the ranks load it
        load_config(args.config, eval_overrides(args.set or [], args.data, args.batches))
    elif command == "submit":
        args.dry_run = True  # print the script, submit nothing
        assert submit_main(args) == 0
        capsys.readouterr()
    elif command == "run":
        load_config(args.config, args.set or [])
    elif command == "plan" and args.config:
        _plan_config(args)
    elif command == "scale":
        spec = load_sweep(args.sweep)
        for point in expand(spec):
            point_config(spec, point)
    elif argv[:2] == ["bench", "train"]:
        bench_train.check(args)  # run and baseline configs, rank and step counts, --repeats, --png, threads
    elif argv[:2] == ["bench", "launch"]:
        load_config(args.config, args.set or [])
    elif command == "eval":  # the config as its ranks load it (--data and --batches are overrides)
        load_config(args.config, eval_overrides(args.set or [], args.data, args.batches))


@pytest.mark.parametrize("where, command", EXAMPLES,
                         ids=[f"{w}: {c.removeprefix('dist-train ')[:60]}" for w, c in EXAMPLES])
def test_example_parses_and_its_config_validates(where, command, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    command, ranks = _as_dist_train(command)
    argv = shlex.split(command)[1:]
    try:
        args = build_parser(argv[0]).parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse: {capsys.readouterr().err.strip()}")
    if not any(a.startswith("configs/") for a in argv):
        return
    try:
        _check_config_of(args, argv, capsys)
        if ranks is not None and argv[0] == "run":
            world = load_config(args.config, args.set or []).world_size
            assert world == ranks, f"{where}: `{command}` under {ranks} ranks, but its config's world size is {world}"
    except ValueError as e:  # ConfigError included
        pytest.fail(f"{where}: `{command}` fails: {e}")


def _stated(default) -> bool:
    """A default worth stating: a value the command will use, not 'unset' (None, off, empty, the config's). By
    identity: 0 == False, and a default of 0 (steps, a window, a seed) is a value the command uses."""
    return not (default is None or default is False or default is argparse.SUPPRESS or default == [])


def test_every_option_says_what_it_defaults_to():
    """`dist-train bench memory` with no flags sweeps S up to 1M tokens: a person reading --help must see that
    before running it. Every option with a default the command uses says it in its help line."""
    silent = []
    for parser in _parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and _stated(action.default):
                text = formatter._expand_help(action) if action.help else ""
                if "default" not in text:
                    silent.append(f"{parser.prog} {action.option_strings[-1]} (default {action.default!r})")
    assert not silent, "\n".join(silent)


def test_a_default_of_zero_is_stated():
    """0 == False: a rule written as `default in (None, False, ...)` hid a default of 0 (or 0.0) from the help line
    and from the check above alike."""
    parser = ArgumentParser(prog="x", formatter_class=_F)
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    parser.add_argument("--lr-floor", type=float, default=0.0, help="lowest learning rate")
    parser.add_argument("--fast", action="store_true", help="skip the checks")
    text = " ".join(parser.format_help().split())
    assert "warm-up steps (default 0)" in text and "lowest learning rate (default 0.0)" in text, text
    assert "skip the checks (default" not in text
    assert _stated(0) and _stated(0.0) and not _stated(False) and not _stated(None) and not _stated([])


@pytest.mark.parametrize("word, meant", [("sweep", "scale"), ("train", "launch"), ("evaluate", "eval"),
                                         ("convert", "ckpt")])
def test_a_command_word_of_another_commands_job_names_that_command(word, meant, capsys):
    """`dist-train sweep` listed the ten valid commands; `scale` runs sweeps: the line says so."""
    assert main([word, "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no command {word!r}: did you mean `dist-train {meant}`" in err, err
    assert meant in _COMMANDS and word not in _COMMANDS
