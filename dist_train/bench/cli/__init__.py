"""The command-line face of each `dist-train bench NAME` command, torch-free: ``dist_train/cli.py`` imports every
module here to build the ``bench`` parser (``dist-train bench attention --help`` must not pay for torch).

Each module NAME defines ``HELP`` (its one-line help), ``add_arguments(parser)`` (flags and the ``--help``
examples) and ``check(args)``: the validation that needs no torch, raising ValueError with one line before
anything is measured; what it returns (the parsed values) is handed to ``dist_train.bench.NAME.run(args,
checked)``, the measuring module, which the CLI imports only once NAME was chosen and its arguments passed."""
