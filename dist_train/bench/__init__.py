"""`dist-train bench …` subcommands: each module here defines HELP, add_arguments(parser) and run(args) -> int.

dist_train/cli.py imports every module here to build the `bench` parser, so their module tops stay torch-free
(`dist-train bench attention --help` must not pay for torch and the trainer): torch, and what imports it, is
imported inside the functions that measure. Every other function-local import in this package is that case,
or matplotlib for a plot that was asked for."""
