"""`dist-train bench …` subcommands. Each command NAME is two modules:

* ``dist_train.bench.cli.NAME`` — torch-free: ``HELP``, ``add_arguments(parser)`` and ``check(args)`` (the
  validation that needs no torch). ``dist_train/cli.py`` imports all of them to build the ``bench`` parser, so
  ``--help`` and a refused argument cost no torch import.
* ``dist_train.bench.NAME`` — the measurement: imports torch and what it needs at its top, and defines
  ``run(args, checked) -> int`` (``checked``: what ``check`` returned). ``dist_train/cli.py`` imports it by
  name once NAME was chosen and ``check`` passed, the one place a bench command is dispatched.

Modules starting with ``_`` are parts of the measurements: shared (``_paired``, ``_paired_plot``, ``_os_meters``)
or one command's mode (``_ckpt_engines``: ``bench ckpt --engine``, whose ranks import it alone). matplotlib alone is
imported inside the function that draws a plot that was asked for: the ranks import their measuring module
(their rank function lives there) and report their own peak memory, which an unused matplotlib would inflate."""
