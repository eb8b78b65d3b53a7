"""One module per `launch.py` command; each defines add_arguments(parser) and run(args) -> int."""
