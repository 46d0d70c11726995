"""`dist-train bench …` subcommands: each module here defines HELP, add_arguments(parser) and run(args) -> int."""
